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

/* M > 1: a tile of MT activation rows x NR row blocks. Each block is loaded and split into its four
 * shifted code vectors once, then used by all MT rows: 4*NR code registers and MT*NR accumulators
 * (MT = 8, NR = 2: 8 + 16 of the 32 zmm; MT <= 3, NR = 4: 16 + 12). With pf, each of the NR streams
 * is prefetched PF_DIST blocks ahead as in gemv_rows: small-M decode steps (a few sequences) read
 * cold weights like M = 1 and were bound by the lines in flight without it (M = 2 cost twice M = 1). */
INLINE T512 void gemm_tile(const i2v_gemm_args *a, int m0, int rb, const int MT, const int NR, int pf_on) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    const int8_t *x = a->x + (size_t)m0 * a->ldx;
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[8][4];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_si512();
    for (int kb = 0; kb < a->Kb; kb++) {
        __m512i c[4][4];
        const size_t pf = PF_DIST * I2V_BLOCK + (kb + PF_DIST >= a->Kb ? (size_t)(NR - 1) * stride : 0);
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
            __m512i v = _mm512_loadu_si512((const void *)blk);
            if (pf_on) _mm_prefetch((const char *)(blk + pf), _MM_HINT_T0);
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
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], c[r][s], xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) store_rows(a, m0 + m, rb + r, acc[m][r]);
}

/* constant MT and NR for each instantiation of tile kernel fn (gemm_tile, t5_small_tile), so its
 * accumulators and code vectors live in registers */
#define TILE_CASES(fn, NR, PF)                      \
    switch (mt) {                                   \
    case 8: fn(a, m0, rb, 8, NR, PF); break;        \
    case 7: fn(a, m0, rb, 7, NR, PF); break;        \
    case 6: fn(a, m0, rb, 6, NR, PF); break;        \
    case 5: fn(a, m0, rb, 5, NR, PF); break;        \
    case 4: fn(a, m0, rb, 4, NR, PF); break;        \
    case 3: fn(a, m0, rb, 3, NR, PF); break;        \
    case 2: fn(a, m0, rb, 2, NR, PF); break;        \
    default: fn(a, m0, rb, 1, NR, PF); break;       \
    }

/* row blocks rb .. rb1 - 1 in pairs, each pair under tiles of up to 8 activation rows; the first tile of
 * a pair prefetches when PF (the weights read once, from memory) */
#define PAIR_TILES(fn, PF)                                        \
    for (; rb < rb1; rb += 2) {                                   \
        for (int m0 = 0; m0 < a->M; m0 += 8) {                    \
            int mt = a->M - m0 < 8 ? a->M - m0 : 8;               \
            if (rb + 2 <= rb1) {                                  \
                TILE_CASES(fn, 2, (PF) && m0 == 0)                \
            } else {                                              \
                TILE_CASES(fn, 1, (PF) && m0 == 0)                \
            }                                                     \
        }                                                         \
    }

/* Up to SMALL_M rows (below the AMX path's 20, i2v_amx_min_m), the weights stream from memory once per
 * call (decode of a few sequences): prefetch ahead; M = 2, 3 stream 4 row blocks side by side as
 * gemv_rows does. Larger M (prefill) re-reads each row-block pair from L1/L2 for every 8-row tile and needs no prefetch. */
#define SMALL_M 19

static T512 void gemm_small_m(const i2v_gemm_args *a, int rb0, int rb1) {
    int rb = rb0;
    if (a->M <= 3) {
        for (; rb + 4 <= rb1; rb += 4) {
            int m0 = 0, mt = a->M;
            if (mt == 3) gemm_tile(a, m0, rb, 3, 4, 1);
            else gemm_tile(a, m0, rb, 2, 4, 1);
        }
    }
    PAIR_TILES(gemm_tile, 1)
}

T512 void i2v_gemm_avx512vnni(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1) {
        int rb = rb0;
        for (; rb + 4 <= rb1; rb += 4) gemv_rows(a, rb, 4);
        for (; rb < rb1; rb++) gemv_rows(a, rb, 1);
        return;
    }
    if (a->M <= SMALL_M) {
        gemm_small_m(a, rb0, rb1);
        return;
    }
    /* row-block pairs outer: their 2 * Kb * 64 bytes of codes stay in L1/L2 across all m tiles */
    int rb = rb0;
    PAIR_TILES(gemm_tile, 0)
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

/* ==== T5, the 1.6-bit layout (formats/t5.py) ==========================================================
 * Decode (M = 1) never isolates a code. With y_0 = the block's bytes and y_{j+1} = 3 y_j mod 256
 * (byte-wise: y + y + y, wrapping), the code t_j = (3 y_j - y_{j+1}) / 256 exactly, so for a row
 *     256 * sum_j x_j . t_j = 3 * sum_j x_j . y_j - sum_j x_j . y_{j+1}
 * where x_j is the broadcast of x[20kb + 4j .. +3] and each dot is a vpdpbusd on the raw bytes (unsigned
 * 0..255, as vpdpbusd wants). Two accumulators A (x_j . y_j) and B (x_j . y_{j+1}); per 64-byte block,
 * 5 multiply-by-3 steps (10 byte adds) and 10 vpdpbusd for 320 weights (I2V: 4 ands and 4 vpdpbusd for
 * 256). Bound: a lane of A or B gains at most 5 * 4 * 255 * 128 = 652800 per block, so over T5_FLUSH_KB
 * = 512 blocks 3A < 1.003e9 < 2^31: no int32 overflow anywhere; longer rows flush every 512 blocks
 * (10240 columns). (3A - B) is then an exact multiple of 256: the arithmetic shift divides exactly. */
#define T5_FLUSH_KB 512

INLINE T512 __m512i times3(__m512i y) { return _mm512_add_epi8(y, _mm512_add_epi8(y, y)); }

INLINE T512 void t5_gemv_rows(const i2v_gemm_args *a, int rb, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    __m512i total[4];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) total[r] = _mm512_setzero_si512();
    for (int k0 = 0; k0 < a->Kb; k0 += T5_FLUSH_KB) {
        int k1 = a->Kb - k0 < T5_FLUSH_KB ? a->Kb : k0 + T5_FLUSH_KB;
        __m512i A[4], B[4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) A[r] = B[r] = _mm512_setzero_si512();
        for (int kb = k0; kb < k1; kb++) {
            const int8_t *xk = a->x + kb * T5_COLS;
            __m512i x0 = bcast4(xk), x1 = bcast4(xk + 4), x2 = bcast4(xk + 8), x3 = bcast4(xk + 12),
                    x4 = bcast4(xk + 16);
            const size_t pf = PF_DIST * I2V_BLOCK + (kb + PF_DIST >= a->Kb ? (size_t)(NR - 1) * stride : 0);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
                __m512i y = _mm512_loadu_si512((const void *)blk);
                _mm_prefetch((const char *)(blk + pf), _MM_HINT_T0);
                A[r] = _mm512_dpbusd_epi32(A[r], y, x0);
                y = times3(y);
                B[r] = _mm512_dpbusd_epi32(B[r], y, x0);
                A[r] = _mm512_dpbusd_epi32(A[r], y, x1);
                y = times3(y);
                B[r] = _mm512_dpbusd_epi32(B[r], y, x1);
                A[r] = _mm512_dpbusd_epi32(A[r], y, x2);
                y = times3(y);
                B[r] = _mm512_dpbusd_epi32(B[r], y, x2);
                A[r] = _mm512_dpbusd_epi32(A[r], y, x3);
                y = times3(y);
                B[r] = _mm512_dpbusd_epi32(B[r], y, x3);
                A[r] = _mm512_dpbusd_epi32(A[r], y, x4);
                y = times3(y);
                B[r] = _mm512_dpbusd_epi32(B[r], y, x4);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m512i s = _mm512_sub_epi32(_mm512_add_epi32(A[r], _mm512_add_epi32(A[r], A[r])), B[r]);
            total[r] = _mm512_add_epi32(total[r], _mm512_srai_epi32(s, 8));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) store_rows(a, 0, rb + r, total[r]);
}

/* Prefill (M > T5_SMALL_M): the codes are decoded once per chunk of T5_CH blocks of a row-block pair into planes
 * (code bytes 0..2, plane j of block kb = the codes of columns 4j..4j+3 in each row's lane, the same
 * vectors I2V's gemm_tile makes with its shifts), then every activation row of a panel runs over the
 * chunk with plain vpdpbusd: 5 per block and row for 320 weights, as I2V's 4 for 256. The int32 sums
 * of a panel live in a small buffer between chunks. t_j = (y_j >= 86) + (y_j >= 171), each comparison
 * as min(y - c saturated, 1). Stack: planes 2 * 16 * 5 * 64 = 10 KB, sums 64 * 2 * 64 = 8 KB. */
#define T5_CH 16
#define T5_PANEL 64

INLINE T512 void t5_decode_chunk(const uint8_t *blk, int nkb, __m512i *planes) {
    const __m512i one = _mm512_set1_epi8(1), c85 = _mm512_set1_epi8(85), c170 = _mm512_set1_epi8((char)170);
    for (int kb = 0; kb < nkb; kb++) {
        __m512i y = _mm512_loadu_si512((const void *)(blk + (size_t)kb * I2V_BLOCK));
        for (int j = 0; j < 5; j++) {
            __m512i t = _mm512_add_epi8(_mm512_min_epu8(_mm512_subs_epu8(y, c85), one),
                                        _mm512_min_epu8(_mm512_subs_epu8(y, c170), one));
            _mm512_storeu_si512((void *)(planes + 5 * kb + j), t);
            y = times3(y);
        }
    }
}

/* acc[m][r] (int32 [MT][NR][16] in memory) += the chunk's sums of rows x + m * ldx (x at the chunk) */
INLINE T512 void t5_tile(const int8_t *x, size_t ldx, const __m512i *planes, int nkb, int32_t *acc,
                         const int MT, const int NR) {
    __m512i s[8][2];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) s[m][r] = _mm512_loadu_si512((const void *)(acc + (2 * m + r) * 16));
    for (int kb = 0; kb < nkb; kb++) {
#pragma GCC unroll 5
        for (int j = 0; j < 5; j++) {
            __m512i c0 = _mm512_loadu_si512((const void *)(planes + 5 * kb + j));
            __m512i c1 = _mm512_loadu_si512((const void *)(planes + 5 * (T5_CH + kb) + j));
#pragma GCC unroll 8
            for (int m = 0; m < MT; m++) {
                __m512i xb = bcast4(x + (size_t)m * ldx + kb * T5_COLS + 4 * j);
                s[m][0] = _mm512_dpbusd_epi32(s[m][0], c0, xb);
                if (NR > 1) s[m][1] = _mm512_dpbusd_epi32(s[m][1], c1, xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) _mm512_storeu_si512((void *)(acc + (2 * m + r) * 16), s[m][r]);
}

#define T5_TILE_CASES(NR)                                                   \
    switch (mt) {                                                           \
    case 8: t5_tile(xm, a->ldx, planes, nkb, accm, 8, NR); break;           \
    case 7: t5_tile(xm, a->ldx, planes, nkb, accm, 7, NR); break;           \
    case 6: t5_tile(xm, a->ldx, planes, nkb, accm, 6, NR); break;           \
    case 5: t5_tile(xm, a->ldx, planes, nkb, accm, 5, NR); break;           \
    case 4: t5_tile(xm, a->ldx, planes, nkb, accm, 4, NR); break;           \
    case 3: t5_tile(xm, a->ldx, planes, nkb, accm, 3, NR); break;           \
    case 2: t5_tile(xm, a->ldx, planes, nkb, accm, 2, NR); break;           \
    default: t5_tile(xm, a->ldx, planes, nkb, accm, 1, NR); break;          \
    }

/* Small M (a few sequences' decode, speculative verify rows), up to T5_SMALL_M rows: the weights stream
 * from memory once per call, so nothing goes through memory but them (the prefill kernel's planes on the
 * stack cost a 2-row forward twice a 1-row one at the 2B4T shape, 2 threads, Xeon: pp2 31 t/s against
 * pp1 35; this kernel 60-65, and pp5 118 against 73, pp9 129 against 105; on this path alone, 16-19 rows
 * 157-185 against the planes kernel's 155-168; the AMX path takes T5 from 16 rows, i2v_amx_min_m).
 * MT activation rows x NR row blocks, prefetched as I2V's gemm_tile. Each block's five digit planes are
 * made in registers and used by all MT rows: t_j = 1 where y_j >= 86, 2 where y_j >= 171 (two byte
 * compares into masks, a masked move and a blend), y_{j+1} = 3 y_j; then 5 vpdpbusd a row, as the
 * prefill tile's. */
INLINE T512 void t5_small_tile(const i2v_gemm_args *a, int m0, int rb, const int MT, const int NR, int pf_on) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    const int8_t *x = a->x + (size_t)m0 * a->ldx;
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2), c86 = _mm512_set1_epi8(86),
                  c171 = _mm512_set1_epi8((char)171);
    __m512i acc[8][4];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_si512();
    for (int kb = 0; kb < a->Kb; kb++) {
        __m512i y[4];
        const size_t pf = PF_DIST * I2V_BLOCK + (kb + PF_DIST >= a->Kb ? (size_t)(NR - 1) * stride : 0);
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
            y[r] = _mm512_loadu_si512((const void *)blk);
            if (pf_on) _mm_prefetch((const char *)(blk + pf), _MM_HINT_T0);
        }
#pragma GCC unroll 5
        for (int j = 0; j < 5; j++) {
            __m512i t[4];
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                __mmask64 ge1 = _mm512_cmpge_epu8_mask(y[r], c86), ge2 = _mm512_cmpge_epu8_mask(y[r], c171);
                t[r] = _mm512_mask_blend_epi8(ge2, _mm512_maskz_mov_epi8(ge1, one), two);
                if (j < 4) y[r] = times3(y[r]);
            }
#pragma GCC unroll 8
            for (int m = 0; m < MT; m++) {
                __m512i xb = bcast4(x + (size_t)m * a->ldx + kb * T5_COLS + 4 * j);
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], t[r], xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) store_rows(a, m0 + m, rb + r, acc[m][r]);
}

/* M = 2, 3 the GEMV's way (no planes): per block and row 10 vpdpbusd on the raw bytes y_0 .. y_5, no
 * compares (pp2 65 t/s against the planes tile's 60; pp3 about equal) */
INLINE T512 void t5_ab_tile(const i2v_gemm_args *a, int rb, const int MT, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const uint8_t *w = a->w + rb * stride;
    __m512i total[3][4];
#pragma GCC unroll 3
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) total[m][r] = _mm512_setzero_si512();
    for (int k0 = 0; k0 < a->Kb; k0 += T5_FLUSH_KB) {
        int k1 = a->Kb - k0 < T5_FLUSH_KB ? a->Kb : k0 + T5_FLUSH_KB;
        __m512i A[3][4], B[3][4];
#pragma GCC unroll 3
        for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) A[m][r] = B[m][r] = _mm512_setzero_si512();
        for (int kb = k0; kb < k1; kb++) {
            __m512i y[4];
            const size_t pf = PF_DIST * I2V_BLOCK + (kb + PF_DIST >= a->Kb ? (size_t)(NR - 1) * stride : 0);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = w + r * stride + (size_t)kb * I2V_BLOCK;
                y[r] = _mm512_loadu_si512((const void *)blk);
                _mm_prefetch((const char *)(blk + pf), _MM_HINT_T0);
            }
#pragma GCC unroll 5
            for (int j = 0; j < 5; j++) {
                __m512i xb[3];
#pragma GCC unroll 3
                for (int m = 0; m < MT; m++) xb[m] = bcast4(a->x + (size_t)m * a->ldx + kb * T5_COLS + 4 * j);
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) {
#pragma GCC unroll 3
                    for (int m = 0; m < MT; m++) A[m][r] = _mm512_dpbusd_epi32(A[m][r], y[r], xb[m]);
                    y[r] = times3(y[r]);
#pragma GCC unroll 3
                    for (int m = 0; m < MT; m++) B[m][r] = _mm512_dpbusd_epi32(B[m][r], y[r], xb[m]);
                }
            }
        }
#pragma GCC unroll 3
        for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                __m512i d = _mm512_sub_epi32(_mm512_add_epi32(A[m][r], _mm512_add_epi32(A[m][r], A[m][r])), B[m][r]);
                total[m][r] = _mm512_add_epi32(total[m][r], _mm512_srai_epi32(d, 8));
            }
    }
#pragma GCC unroll 3
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) store_rows(a, m, rb + r, total[m][r]);
}

#define T5_SMALL_M 19 /* as I2V's SMALL_M */

static T512 void t5_gemm_small_m(const i2v_gemm_args *a, int rb0, int rb1) {
    int rb = rb0;
    if (a->M <= 3) {
        for (; rb + 4 <= rb1; rb += 4) {
            if (a->M == 3) {
                t5_ab_tile(a, rb, 3, 2);
                t5_ab_tile(a, rb + 2, 3, 2);
            } else {
                t5_ab_tile(a, rb, 2, 4);
            }
        }
    }
    PAIR_TILES(t5_small_tile, 1)
}

T512 void t5_gemm_avx512vnni(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1) {
        int rb = rb0;
        for (; rb + 4 <= rb1; rb += 4) t5_gemv_rows(a, rb, 4);
        for (; rb < rb1; rb++) t5_gemv_rows(a, rb, 1);
        return;
    }
    if (a->M <= T5_SMALL_M) {
        t5_gemm_small_m(a, rb0, rb1);
        return;
    }
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    __m512i planes[2 * T5_CH * 5];
    int32_t acc[T5_PANEL * 2 * 16] __attribute__((aligned(64)));
    for (int p0 = 0; p0 < a->M; p0 += T5_PANEL) {
        int pm = a->M - p0 < T5_PANEL ? a->M - p0 : T5_PANEL;
        for (int rb = rb0; rb < rb1; rb += 2) {
            int nr = rb + 2 <= rb1 ? 2 : 1;
            memset(acc, 0, sizeof acc);
            for (int k0 = 0; k0 < a->Kb; k0 += T5_CH) {
                int nkb = a->Kb - k0 < T5_CH ? a->Kb - k0 : T5_CH;
                for (int r = 0; r < nr; r++)
                    t5_decode_chunk(a->w + (rb + r) * stride + (size_t)k0 * I2V_BLOCK, nkb, planes + 5 * T5_CH * r);
                for (int m0 = 0; m0 < pm; m0 += 8) {
                    int mt = pm - m0 < 8 ? pm - m0 : 8;
                    const int8_t *xm = a->x + (size_t)(p0 + m0) * a->ldx + (size_t)k0 * T5_COLS;
                    int32_t *accm = acc + m0 * 2 * 16;
                    if (nr == 2) {
                        T5_TILE_CASES(2)
                    } else {
                        T5_TILE_CASES(1)
                    }
                }
            }
            for (int m = 0; m < pm; m++)
                for (int r = 0; r < nr; r++)
                    store_rows(a, p0 + m, rb + r, _mm512_loadu_si512((const void *)(acc + (2 * m + r) * 16)));
        }
    }
}

#endif
