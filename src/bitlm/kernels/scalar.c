/* Scalar reference: walks the I2V layout exactly as the SIMD kernels do (block by block, byte
 * 4r+j, shift s), so a layout bug shows up here too. Also the portable fallback and baseline. */
#include <math.h>

#include "i2v.h"

void i2v_gemm_scalar(const i2v_gemm_args *a, int rb0, int rb1) {
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wrb = a->w + (size_t)rb * a->Kb * I2V_BLOCK;  /* [Kb, 64] of this row block */
        int nrows = a->N - rb * I2V_ROWS;
        if (nrows > I2V_ROWS) nrows = I2V_ROWS;
        for (int m = 0; m < a->M; m++) {
            const int8_t *xm = a->x + (size_t)m * a->ldx;
            int32_t acc[I2V_ROWS] = {0};  /* lane r = row 16rb + r, as in a zmm accumulator */
            for (int kb = 0; kb < a->Kb; kb++) {
                const uint8_t *blk = wrb + (size_t)kb * I2V_BLOCK;
                const int8_t *xk = xm + kb * I2V_COLS;
                for (int b = 0; b < I2V_BLOCK; b++) {
                    int r = b >> 2, j = b & 3;
                    for (int s = 0; s < 4; s++) acc[r] += ((blk[b] >> (2 * s)) & 3) * xk[4 * s + j];
                }
            }
            int32_t *ym = a->y + (size_t)m * a->ldy + rb * I2V_ROWS;
            for (int r = 0; r < nrows; r++) ym[r] = acc[r] - a->xsum[m];
        }
    }
}

void i2v_quant_scalar(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                      float *scale, int32_t *qsum) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * ldx;
        int8_t *qm = q + (size_t)m * ldq;
        float amax = 0.0f;
        for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        /* torch evaluates 127 / t as reciprocal(t) * 127: the same two roundings, bit for bit */
        float s = (1.0f / fmaxf(amax, 1e-5f)) * 127.0f;
        int32_t sum = 0;
        for (int k = 0; k < K; k++) {
            float v = nearbyintf(xm[k] * s);  /* default rounding mode: half to even = torch.round */
            v = fminf(fmaxf(v, -128.0f), 127.0f);
            qm[k] = (int8_t)v;
            sum += (int32_t)v;
        }
        for (size_t k = (size_t)K; k < ldq; k++) qm[k] = 0;
        scale[m] = s;
        qsum[m] = sum;
    }
}

/* Q6 rows: walks each 48-byte group as 8 little-endian 6-byte pieces of 8 codes, as the VBMI kernel */
void i2v_q6_scalar(const i2v_q6_args *a, int v0, int v1) {
    int ng = (a->H + 63) / 64;
    for (int m = 0; m < a->M; m++) {
        const int8_t *x = a->x + (size_t)m * a->ldx;
        for (int v = v0; v < v1; v++) {
            const uint8_t *row = a->w + (size_t)v * ng * 48;
            int32_t acc = 0;
            for (int g = 0; g < ng; g++)
                for (int L = 0; L < 8; L++) {
                    const uint8_t *b = row + g * 48 + 6 * L;
                    uint64_t piece = 0;
                    for (int i = 0; i < 6; i++) piece |= (uint64_t)b[i] << (8 * i);
                    for (int j = 0; j < 8; j++) acc += (int32_t)((piece >> (6 * j)) & 63) * x[64 * g + 8 * L + j];
                }
            a->out[(size_t)m * a->ldo + v] = acc - 32 * a->xsum[m];
        }
    }
}

/* T5 (formats/t5.py): walks the layout as the SIMD kernels do, block by block, byte 4r+i, digit j by
 * the multiply-by-3 steps y_{j+1} = 3 y_j mod 256, t_j = (3 y_j) >> 8 */
void t5_gemm_scalar(const i2v_gemm_args *a, int rb0, int rb1) {
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wrb = a->w + (size_t)rb * a->Kb * I2V_BLOCK;  /* [Kb, 64] of this row block */
        int nrows = a->N - rb * I2V_ROWS;
        if (nrows > I2V_ROWS) nrows = I2V_ROWS;
        for (int m = 0; m < a->M; m++) {
            const int8_t *xm = a->x + (size_t)m * a->ldx;
            int32_t acc[I2V_ROWS] = {0};
            for (int kb = 0; kb < a->Kb; kb++) {
                const uint8_t *blk = wrb + (size_t)kb * I2V_BLOCK;
                const int8_t *xk = xm + kb * T5_COLS;
                for (int b = 0; b < I2V_BLOCK; b++) {
                    int r = b >> 2, i = b & 3;
                    unsigned y = blk[b];
                    for (int j = 0; j < 5; j++) {
                        acc[r] += (int32_t)((3 * y) >> 8) * xk[4 * j + i];
                        y = (3 * y) & 255;
                    }
                }
            }
            int32_t *ym = a->y + (size_t)m * a->ldy + rb * I2V_ROWS;
            for (int r = 0; r < nrows; r++) ym[r] = acc[r] - a->xsum[m];
        }
    }
}
