/* AVX2 path: vpmaddubsw (unsigned codes x signed activations -> int16 pairs), then vpmaddwd with
 * ones to int32. A ymm takes one half of an I2V block: bytes 0..31 = rows 0..7, bytes 32..63 =
 * rows 8..15; lane i of half h is row 8h+i, exactly as in the zmm path.
 * No int16 overflow: one vpmaddubsw pair is at most 2 * 2 * 128 = 512 in magnitude, and four
 * shifts are summed (2048) before widening. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "i2v.h"

#define T256 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

INLINE T256 __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 8 rows x 16 columns: int32 lane i += sum of row i's 16 products */
INLINE T256 __m256i dot_half(__m256i acc, __m256i v, __m256i m3, __m256i ones, __m256i x0,
                             __m256i x1, __m256i x2, __m256i x3) {
    __m256i p = _mm256_maddubs_epi16(_mm256_and_si256(v, m3), x0);
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3), x1));
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3), x2));
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3), x3));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

INLINE T256 void store_half(const i2v_gemm_args *a, int m, int rb, int h, __m256i acc) {
    int n0 = rb * I2V_ROWS + 8 * h;
    int nrows = a->N - n0;
    if (nrows <= 0) return;
    __m256i y = _mm256_sub_epi32(acc, _mm256_set1_epi32(a->xsum[m]));
    int32_t *dst = a->y + (size_t)m * a->ldy + n0;
    if (nrows >= 8) {
        _mm256_storeu_si256((__m256i *)dst, y);
    } else {
        int32_t tmp[8];
        _mm256_storeu_si256((__m256i *)tmp, y);
        memcpy(dst, tmp, (size_t)nrows * sizeof(int32_t));
    }
}

#define PF_DIST 24  /* software prefetch distance in blocks, as in the AVX-512 GEMV */

/* Decode (M = 1): NR row blocks (2 halves each) side by side share the activation broadcasts. */
INLINE T256 void gemv_rows(const i2v_gemm_args *a, int rb, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[2][2];
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int kb = 0; kb < a->Kb; kb++) {
        const int8_t *xk = a->x + kb * I2V_COLS;
        __m256i x0 = bcast4(xk), x1 = bcast4(xk + 4), x2 = bcast4(xk + 8), x3 = bcast4(xk + 12);
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
            _mm_prefetch((const char *)(blk + PF_DIST * I2V_BLOCK), _MM_HINT_T0);
            acc[r][0] = dot_half(acc[r][0], _mm256_loadu_si256((const __m256i *)blk), m3, ones, x0, x1, x2, x3);
            acc[r][1] = dot_half(acc[r][1], _mm256_loadu_si256((const __m256i *)(blk + 32)), m3, ones, x0, x1, x2, x3);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++) {
        store_half(a, 0, rb + r, 0, acc[r][0]);
        store_half(a, 0, rb + r, 1, acc[r][1]);
    }
}

/* Prefill (M > 1): MT activation rows x one row block (two halves); 8 accumulators of 16 ymm. */
INLINE T256 void gemm_tile(const i2v_gemm_args *a, int m0, int rb, const int MT) {
    const uint8_t *w = a->w + rb * (size_t)a->Kb * I2V_BLOCK;
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int kb = 0; kb < a->Kb; kb++) {
        const uint8_t *blk = w + (size_t)kb * I2V_BLOCK;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 32 * h));
#pragma GCC unroll 4
            for (int m = 0; m < MT; m++) {
                const int8_t *xk = a->x + (size_t)(m0 + m) * a->ldx + kb * I2V_COLS;
                acc[m][h] = dot_half(acc[m][h], v, m3, ones, bcast4(xk), bcast4(xk + 4),
                                     bcast4(xk + 8), bcast4(xk + 12));
            }
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++) {
        store_half(a, m0 + m, rb, 0, acc[m][0]);
        store_half(a, m0 + m, rb, 1, acc[m][1]);
    }
}

T256 void i2v_gemm_avx2(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1) {
        int rb = rb0;
        for (; rb + 2 <= rb1; rb += 2) gemv_rows(a, rb, 2);
        for (; rb < rb1; rb++) gemv_rows(a, rb, 1);
        return;
    }
    for (int rb = rb0; rb < rb1; rb++) {
        for (int m0 = 0; m0 < a->M; m0 += 4) {
            switch (a->M - m0 < 4 ? a->M - m0 : 4) {
            case 4: gemm_tile(a, m0, rb, 4); break;
            case 3: gemm_tile(a, m0, rb, 3); break;
            case 2: gemm_tile(a, m0, rb, 2); break;
            default: gemm_tile(a, m0, rb, 1); break;
            }
        }
    }
}

/* Activation quantizer, 8 floats per step, scalar tail with the same float operations. */
T256 void i2v_quant_avx2(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                         float *scale, int32_t *qsum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * ldx;
        int8_t *qm = q + (size_t)m * ldq;
        int k8 = K & ~7;
        __m256 mx = _mm256_setzero_ps();
        for (int k = 0; k < k8; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xm + k), absmask));
        float lanes[8];
        _mm256_storeu_ps(lanes, mx);
        float amax = 0.0f;
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, lanes[i]);
        for (int k = k8; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        float s = (1.0f / fmaxf(amax, 1e-5f)) * 127.0f;  /* as torch: reciprocal, then * 127 */
        __m256 vs = _mm256_set1_ps(s);
        __m256i sum = _mm256_setzero_si256();
        for (int k = 0; k < k8; k += 8) {
            __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k), vs), lo), hi);
            __m256i i = _mm256_cvtps_epi32(v);  /* MXCSR default: half to even */
            sum = _mm256_add_epi32(sum, i);
            /* int32 -> int8: two saturating packs leave the 4 bytes of lane 0 in dword 0 and of lane 1 in dword 4 */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i, i), _mm256_setzero_si256());
            int32_t b0 = _mm256_extract_epi32(p, 0), b1 = _mm256_extract_epi32(p, 4);
            memcpy(qm + k, &b0, 4);
            memcpy(qm + k + 4, &b1, 4);
        }
        int32_t sl[8];
        _mm256_storeu_si256((__m256i *)sl, sum);
        int32_t total = sl[0] + sl[1] + sl[2] + sl[3] + sl[4] + sl[5] + sl[6] + sl[7];
        for (int k = k8; k < K; k++) {
            float v = fminf(fmaxf(nearbyintf(xm[k] * s), -128.0f), 127.0f);
            qm[k] = (int8_t)v;
            total += (int32_t)v;
        }
        for (size_t k = (size_t)K; k < ldq; k++) qm[k] = 0;
        scale[m] = s;
        qsum[m] = total;
    }
}

/* Bandwidth probe: stream n bytes (n a multiple of 128) through four independent xor chains. */
T256 uint64_t i2v_read_avx2(const uint8_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 1) ^
           (uint64_t)_mm256_extract_epi64(a, 2) ^ (uint64_t)_mm256_extract_epi64(a, 3);
}
#endif
