/* AVX-512 VNNI path: vpdpbusd (unsigned codes x signed activations, 4 products per int32 lane).
 *
 * One zmm load = one I2V block = 16 rows x 16 columns. (v >> 2s) & 3 leaves in lane r the codes
 * of row r at columns 4s..4s+3; vpdpbusd with x[4s..4s+3] broadcast to all lanes adds their four
 * products to lane r. So a row block accumulates in one zmm, with no horizontal reduction. */
#if defined(__x86_64__) || defined(__i386__)
#include <string.h>

#include "i2v.h"
#include "x86_avx512.h"  /* <immintrin.h>, or SIMDe's portable intrinsics with -DI2V_SIMDE */

#define T512 I2V_TARGET("avx512f,avx512bw,avx512vl,avx512vnni")
#define INLINE static inline __attribute__((always_inline))

/* x[0..3] as one int32, broadcast to the 16 lanes */
INLINE T512 __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

INLINE T512 void store_rows(const i2v_gemm_args *a, int m, int rb, __m512i acc) {
    int nrows = a->N - rb * I2V_ROWS;
    __mmask16 k = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    __m512i y = _mm512_sub_epi32(acc, _mm512_set1_epi32(a->xsum[m]));
    _mm512_mask_storeu_epi32(a->y + (size_t)m * a->ldy + rb * I2V_ROWS, k, y);
}

/* Decode (M = 1), memory-bound: keep the ALU work per 64-byte block small (4 and + 4 vpdpbusd, no
 * shifts). Field s is masked in place, v & (3 << 2s) = 4^s * c, so its vpdpbusd adds 4^s times the
 * true products into its own accumulator; the factor is shifted out (exactly) at the end.
 * Bound: |acc3| <= 64 * 2 * 128 * 16 * FLUSH_KB < 2^31 with FLUSH_KB = 4096 blocks (65536 columns);
 * longer rows flush into a plain int32 total every FLUSH_KB blocks.
 * NR row blocks streamed side by side share the activation broadcasts. */
#define FLUSH_KB 4096
/* Software prefetch 24 blocks (1.5 KB) ahead in each of the NR streams: decode reads cold weights,
 * and per-core bandwidth is limited by the lines in flight; measured +10-15% over the hardware
 * prefetchers alone at the 2B4T shapes (16-32 all similar). Past a stream's end it warms the next
 * row block; prefetches never fault. */
#define PF_DIST 24

INLINE T512 void gemv_rows(const i2v_gemm_args *a, int rb, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;  /* bytes per row block */
    const uint8_t *w = a->w + rb * stride;
    const int8_t *x = a->x;
    const __m512i f0 = _mm512_set1_epi8(0x03), f1 = _mm512_set1_epi8(0x0C), f2 = _mm512_set1_epi8(0x30),
                  f3 = _mm512_set1_epi8((char)0xC0);
    __m512i total[4];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) total[r] = _mm512_setzero_si512();
    for (int k0 = 0; k0 < a->Kb; k0 += FLUSH_KB) {
        int k1 = a->Kb - k0 < FLUSH_KB ? a->Kb : k0 + FLUSH_KB;
        __m512i acc[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_si512();
        for (int kb = k0; kb < k1; kb++) {
            const int8_t *xk = x + kb * I2V_COLS;
            __m512i x0 = bcast4(xk), x1 = bcast4(xk + 4), x2 = bcast4(xk + 8), x3 = bcast4(xk + 12);
            /* near the end of the rows, prefetch the same stream of the next group of NR row blocks
             * (NR - 1 row blocks further on) instead of the neighbour's bytes, already read */
            const size_t pf = PF_DIST * I2V_BLOCK + (kb + PF_DIST >= a->Kb ? (size_t)(NR - 1) * stride : 0);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
                __m512i v = _mm512_loadu_si512((const void *)blk);
                _mm_prefetch((const char *)(blk + pf), _MM_HINT_T0);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(v, f0), x0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(v, f1), x1);
                acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(v, f2), x2);
                acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(v, f3), x3);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m512i t = _mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2));
            t = _mm512_add_epi32(t, _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
            total[r] = _mm512_add_epi32(total[r], t);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) store_rows(a, 0, rb + r, total[r]);
}

/* Prefill (M > 1): a tile of MT activation rows x NR row blocks. Each block is loaded and split
 * into its four shifted code vectors once, then used by all MT rows: 4*NR code registers and
 * MT*NR accumulators (MT = 8, NR = 2: 8 + 16 of the 32 zmm). */
INLINE T512 void gemm_tile(const i2v_gemm_args *a, int m0, int rb, const int MT, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    const int8_t *x = a->x + (size_t)m0 * a->ldx;
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[8][2];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_si512();
    for (int kb = 0; kb < a->Kb; kb++) {
        __m512i c[2][4];
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            __m512i v = _mm512_loadu_si512((const void *)(w + r * stride + (size_t)kb * I2V_BLOCK));
            c[r][0] = _mm512_and_si512(v, m3);
            c[r][1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
            c[r][2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
            c[r][3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            const int8_t *xk = x + (size_t)m * a->ldx + kb * I2V_COLS;
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                __m512i xb = bcast4(xk + 4 * s);
#pragma GCC unroll 2
                for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], c[r][s], xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) store_rows(a, m0 + m, rb + r, acc[m][r]);
}

/* constant MT and NR for each instantiation, so acc[][] and c[][] live in registers */
#define TILE_CASES(NR)                                  \
    switch (mt) {                                       \
    case 8: gemm_tile(a, m0, rb, 8, NR); break;         \
    case 7: gemm_tile(a, m0, rb, 7, NR); break;         \
    case 6: gemm_tile(a, m0, rb, 6, NR); break;         \
    case 5: gemm_tile(a, m0, rb, 5, NR); break;         \
    case 4: gemm_tile(a, m0, rb, 4, NR); break;         \
    case 3: gemm_tile(a, m0, rb, 3, NR); break;         \
    case 2: gemm_tile(a, m0, rb, 2, NR); break;         \
    default: gemm_tile(a, m0, rb, 1, NR); break;        \
    }

T512 void i2v_gemm_avx512vnni(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1) {
        int rb = rb0;
        for (; rb + 4 <= rb1; rb += 4) gemv_rows(a, rb, 4);
        for (; rb < rb1; rb++) gemv_rows(a, rb, 1);
        return;
    }
    /* row-block pairs outer: their 2 * Kb * 64 bytes of codes stay in L1/L2 across all m tiles */
    for (int rb = rb0; rb < rb1; rb += 2) {
        for (int m0 = 0; m0 < a->M; m0 += 8) {
            int mt = a->M - m0 < 8 ? a->M - m0 : 8;
            if (rb + 2 <= rb1) {
                TILE_CASES(2)
            } else {
                TILE_CASES(1)
            }
        }
    }
}

/* Activation quantizer, 16 floats per step; masked loads/stores for the tail. cvtps_epi32 rounds
 * with MXCSR's default mode (half to even), the same as nearbyintf and torch.round. */
T512 void i2v_quant_avx512(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                           float *scale, int32_t *qsum) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * ldx;
        int8_t *qm = q + (size_t)m * ldq;
        __m512 mx = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __mmask16 km = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(km, xm + k)));
        }
        float amax = _mm512_reduce_max_ps(mx);
        float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;  /* as torch: reciprocal, then * 127 */
        __m512 vs = _mm512_set1_ps(s);
        __m512i sum = _mm512_setzero_si512();
        const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
        for (int k = 0; k < K; k += 16) {
            __mmask16 km = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, xm + k), vs);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            __m512i i = _mm512_cvtps_epi32(v);  /* masked-off lanes are 0 */
            sum = _mm512_add_epi32(sum, i);
            _mm512_mask_cvtsepi32_storeu_epi8(qm + k, km, i);
        }
        for (size_t k = (size_t)K; k < ldq; k++) qm[k] = 0;
        scale[m] = s;
        qsum[m] = _mm512_reduce_add_epi32(sum);
    }
}

/* Bandwidth probe: n bytes (a multiple of 256) read as four interleaved sequential streams (one
 * per quarter), which keeps more hardware-prefetch streams busy than a single one, as the GEMV's
 * four row blocks side by side do. Four independent xor chains. */
T512 uint64_t i2v_read_avx512(const uint8_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    size_t q = n / 256 * 64;  /* bytes per stream */
    for (size_t i = 0; i < q; i += 64) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512((const void *)(p + q + i)));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512((const void *)(p + 2 * q + i)));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512((const void *)(p + 3 * q + i)));
    }
    __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_or_epi64(a);
}
#endif
