/* ARM NEON path (AArch64, with the dot-product extension of Armv8.2, FEAT_DotProd).
 *
 * A 128-bit register takes a quarter of an I2V block: bytes 16h..16h+15 = rows 4h..4h+3, lane i
 * (bytes 4i..4i+3) = row 4h+i. (v >> 2s) & 3 leaves in lane i the codes of columns 4s..4s+3, and
 * sdot by element (vdotq_laneq_s32) multiplies each lane's 4 bytes with lane s of the 16
 * activations x[16kb..16kb+15]: exactly the broadcast the layout was drawn for. The codes 0..2 are
 * valid signed bytes, so the signed dot product is exact. */
#if defined(__aarch64__) && defined(__GNUC__)
#include <arm_neon.h>
#include <string.h>
#include <sys/auxv.h>

#include "i2v.h"

#define TDOT __attribute__((target("arch=armv8.2-a+dotprod")))

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

int i2v_neon_dotprod_supported(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }

/* one row block (16 rows) times activation row m; NR = 1 keeps it short: NEON's 32 registers hold
 * the 4 accumulators, 4 code vectors and the activations of one block */
TDOT static void row_block(const i2v_gemm_args *a, int m, int rb) {
    const uint8_t *w = a->w + (size_t)rb * a->Kb * I2V_BLOCK;
    const int8_t *x = a->x + (size_t)m * a->ldx;
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int kb = 0; kb < a->Kb; kb++) {
        int8x16_t xk = vld1q_s8(x + kb * I2V_COLS);
        const uint8_t *blk = w + (size_t)kb * I2V_BLOCK;
        for (int h = 0; h < 4; h++) {
            uint8x16_t v = vld1q_u8(blk + 16 * h);
            acc[h] = vdotq_laneq_s32(acc[h], vreinterpretq_s8_u8(vandq_u8(v, m3)), xk, 0);
            acc[h] = vdotq_laneq_s32(acc[h], vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)), xk, 1);
            acc[h] = vdotq_laneq_s32(acc[h], vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)), xk, 2);
            acc[h] = vdotq_laneq_s32(acc[h], vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), xk, 3);
        }
    }
    int32_t out[16];
    int32x4_t off = vdupq_n_s32(a->xsum[m]);
    for (int h = 0; h < 4; h++) vst1q_s32(out + 4 * h, vsubq_s32(acc[h], off));
    int nrows = a->N - rb * I2V_ROWS;
    if (nrows > I2V_ROWS) nrows = I2V_ROWS;
    memcpy(a->y + (size_t)m * a->ldy + rb * I2V_ROWS, out, (size_t)nrows * sizeof(int32_t));
}

TDOT void i2v_gemm_neon(const i2v_gemm_args *a, int rb0, int rb1) {
    /* row block outer: its Kb * 64 bytes stay in cache while every activation row uses them */
    for (int rb = rb0; rb < rb1; rb++)
        for (int m = 0; m < a->M; m++) row_block(a, m, rb);
}
/* ==== T5, the 1.6-bit layout (formats/t5.py) ==========================================================
 * A quarter block (16 bytes = rows 4h..4h+3) per register as for I2V. Digit j: t_j = (y_j >= 86) +
 * (y_j >= 171) from two unsigned compares (all-ones where true, so t = -(c1 + c2)), then
 * y_{j+1} = 3 y_j mod 256 (vmulq_u8 wraps); sdot by element with lane j of x[20kb..20kb+15] for j < 4,
 * and a plain sdot with x[20kb+16..19] broadcast for j = 4. */
TDOT static void t5_row_block(const i2v_gemm_args *a, int m, int rb) {
    const uint8_t *w = a->w + (size_t)rb * a->Kb * I2V_BLOCK;
    const int8_t *x = a->x + (size_t)m * a->ldx;
    const uint8x16_t c86 = vdupq_n_u8(86), c171 = vdupq_n_u8(171), three = vdupq_n_u8(3);
    int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int kb = 0; kb < a->Kb; kb++) {
        const int8_t *xk = x + kb * T5_COLS;
        int8x16_t x03 = vld1q_s8(xk);
        int32_t x4v;
        memcpy(&x4v, xk + 16, 4);
        int8x16_t x4 = vreinterpretq_s8_s32(vdupq_n_s32(x4v));
        const uint8_t *blk = w + (size_t)kb * I2V_BLOCK;
        for (int h = 0; h < 4; h++) {
            uint8x16_t y = vld1q_u8(blk + 16 * h);
            int8x16_t t[5];
            for (int j = 0; j < 5; j++) {
                uint8x16_t c = vaddq_u8(vcgeq_u8(y, c86), vcgeq_u8(y, c171));  /* -t, wrapping */
                t[j] = vreinterpretq_s8_u8(vsubq_u8(vdupq_n_u8(0), c));
                y = vmulq_u8(y, three);
            }
            acc[h] = vdotq_laneq_s32(acc[h], t[0], x03, 0);
            acc[h] = vdotq_laneq_s32(acc[h], t[1], x03, 1);
            acc[h] = vdotq_laneq_s32(acc[h], t[2], x03, 2);
            acc[h] = vdotq_laneq_s32(acc[h], t[3], x03, 3);
            acc[h] = vdotq_s32(acc[h], t[4], x4);
        }
    }
    int32_t out[16];
    int32x4_t off = vdupq_n_s32(a->xsum[m]);
    for (int h = 0; h < 4; h++) vst1q_s32(out + 4 * h, vsubq_s32(acc[h], off));
    int nrows = a->N - rb * I2V_ROWS;
    if (nrows > I2V_ROWS) nrows = I2V_ROWS;
    memcpy(a->y + (size_t)m * a->ldy + rb * I2V_ROWS, out, (size_t)nrows * sizeof(int32_t));
}

TDOT void t5_gemm_neon(const i2v_gemm_args *a, int rb0, int rb1) {
    for (int rb = rb0; rb < rb1; rb++)
        for (int m = 0; m < a->M; m++) t5_row_block(a, m, rb);
}

/* The int8 output head's rows (head.c): out[r] = sum over k < H of x[k] * e[r][k] for the nr <= 4 rows
 * e[r], exact int32. 16 columns a step by sdot (int8 by int8, no offset to undo), the rest one by one;
 * each row prefetched I2V_Q8_HEAD_PF bytes ahead, as the x86 heads do (the rows are long streams of
 * their own: head.c hands a token's rows over in four quarters side by side). */
#define I2V_Q8_HEAD_PF 1536
TDOT void i2v_q8_rows_neon(const int8_t *x, const int8_t *const e[4], int nr, int H, int32_t out[4]) {
    int32x4_t c[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    int k = 0;
    for (; k + 16 <= H; k += 16) {
        const int8x16_t xk = vld1q_s8(x + k);
        for (int r = 0; r < nr; r++) {
            if (k % 64 == 0) __builtin_prefetch(e[r] + k + I2V_Q8_HEAD_PF, 0, 3);
            c[r] = vdotq_s32(c[r], xk, vld1q_s8(e[r] + k));
        }
    }
    for (int r = 0; r < nr; r++) {
        int32_t acc = vaddvq_s32(c[r]);
        for (int i = k; i < H; i++) acc += (int32_t)x[i] * e[r][i];
        out[r] = acc;
    }
}

/* Q6 rows (formats/q6.py) times int8 activations. A 48-byte group is 16 triples of bytes, triple t holding
 * the 6-bit codes of columns 4t .. 4t + 3 (bits 0, 6, 12, 18): vld3q puts byte i of every triple in
 * register i, four shifts and masks give code i of every triple, and vld4q deals the activations the
 * same way (x[4t + i] into register i), so sdot multiplies matching columns. The codes u = q + 32 are
 * 0..63, valid signed bytes; out = sum u x - 32 xsum, the scalar kernel's exact sum. A token's rows run
 * in four quarters side by side (four streams from memory, as the x86 kernels). */
#define I2V_Q6_PF 1536
TDOT static inline int32x4_t q6_group(int32x4_t acc, const uint8_t *g, const int8x16x4_t x) {
    const uint8x16x3_t b = vld3q_u8(g);
    const uint8x16_t m63 = vdupq_n_u8(63);
    const uint8x16_t c0 = vandq_u8(b.val[0], m63);
    const uint8x16_t c1 = vandq_u8(vorrq_u8(vshrq_n_u8(b.val[0], 6), vshlq_n_u8(b.val[1], 2)), m63);
    const uint8x16_t c2 = vandq_u8(vorrq_u8(vshrq_n_u8(b.val[1], 4), vshlq_n_u8(b.val[2], 4)), m63);
    const uint8x16_t c3 = vshrq_n_u8(b.val[2], 2);
    acc = vdotq_s32(acc, vreinterpretq_s8_u8(c0), x.val[0]);
    acc = vdotq_s32(acc, vreinterpretq_s8_u8(c1), x.val[1]);
    acc = vdotq_s32(acc, vreinterpretq_s8_u8(c2), x.val[2]);
    return vdotq_s32(acc, vreinterpretq_s8_u8(c3), x.val[3]);
}

/* rows v[0 .. NR) of activation row m side by side, sharing the activations' loads */
TDOT static void q6_rows(const i2v_q6_args *a, int m, const int *v, const int NR) {
    const int ng = (a->H + 63) / 64;
    const int8_t *x = a->x + (size_t)m * a->ldx;
    int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int g = 0; g < ng; g++) {
        const int8x16x4_t xg = vld4q_s8(x + 64 * g);
        for (int r = 0; r < NR; r++) {
            const uint8_t *grp = a->w + ((size_t)v[r] * ng + g) * 48;
            __builtin_prefetch(grp + I2V_Q6_PF, 0, 3);
            acc[r] = q6_group(acc[r], grp, xg);
        }
    }
    for (int r = 0; r < NR; r++) a->out[(size_t)m * a->ldo + v[r]] = vaddvq_s32(acc[r]) - 32 * a->xsum[m];
}

TDOT void i2v_q6_neon(const i2v_q6_args *a, int v0, int v1) {
    int q = (v1 - v0) / 4;
    for (int m = 0; m < a->M; m++) {
        for (int i = 0; i < q; i++) q6_rows(a, m, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) q6_rows(a, m, (const int[]){v}, 1);
    }
}
#else
int i2v_neon_dotprod_supported(void) { return 0; }
#endif
