/* AVX2 path: vpmaddubsw (unsigned codes x signed activations -> int16 pairs), then vpmaddwd with
 * ones to int32. A ymm takes one half of an I2V block: bytes 0..31 = rows 0..7, bytes 32..63 =
 * rows 8..15; lane i of half h is row 8h+i, exactly as in the zmm path.
 * No int16 overflow: one vpmaddubsw pair is at most 2 * 2 * 128 = 512 in magnitude, and four
 * shifts are summed (2048) before widening. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
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

/* Decode (M = 1): NR row blocks rbs[0..NR) side by side share the activation broadcasts. */
INLINE T256 void gemv_rows(const i2v_gemm_args *a, const int *rbs, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    const uint8_t *w[4];
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        w[r] = a->w + rbs[r] * stride;
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    }
    for (int kb = 0; kb < a->Kb; kb++) {
        const int8_t *xk = a->x + kb * I2V_COLS;
        __m256i x0 = bcast4(xk), x1 = bcast4(xk + 4), x2 = bcast4(xk + 8), x3 = bcast4(xk + 12);
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w[r] + (size_t)kb * I2V_BLOCK;
            _mm_prefetch((const char *)(blk + PF_DIST * I2V_BLOCK), _MM_HINT_T0);  /* on into the next row block */
            acc[r][0] = dot_half(acc[r][0], _mm256_loadu_si256((const __m256i *)blk), m3, ones, x0, x1, x2, x3);
            acc[r][1] = dot_half(acc[r][1], _mm256_loadu_si256((const __m256i *)(blk + 32)), m3, ones, x0, x1, x2, x3);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        store_half(a, 0, rbs[r], 0, acc[r][0]);
        store_half(a, 0, rbs[r], 1, acc[r][1]);
    }
}

/* Prefill (M > 1). A row block's codes are unpacked, CHUNK blocks at a time, into 2-bit planes in a
 * small buffer: plane s of half h of block kb is a ymm of 8 rows x 4 columns (byte 4r + j = row
 * 8h + r, column 16kb + 4s + j), exactly what vpmaddubsw wants beside a broadcast of 4 activation
 * bytes. GROUP activation rows then run over the chunk with two int16 accumulators each (one per
 * half): 12 vpmaddubsw per step for 2 plane loads and GROUP broadcasts, widened to int32 once per
 * chunk. No int16 overflow: a lane gains between 2 * 2 * -128 = -512 and 2 * 2 * 127 = 508 per step,
 * so the 4 * CHUNK = 64 steps of a chunk stay within [-32768, 32512], inside int16 (the bound is
 * reached, exactly, by activations of -128 against weights of +1: test_extreme_activations). Twice
 * the chunk of 8 it was, the widening and the accumulator stores are halved: ~10% faster. */
#define CHUNK 16   /* blocks per int16 accumulation */
#define GROUP 6    /* activation rows per register tile: 12 accumulators, 2 planes, 1 broadcast, 1 product */
#define PANEL 48   /* activation rows whose int32 sums stay in a local buffer (a multiple of GROUP) */

INLINE T256 void unpack_chunk(const uint8_t *blk, int nkb, __m256i *planes) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int kb = 0; kb < nkb; kb++)
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + (size_t)kb * I2V_BLOCK + 32 * h));
            __m256i *p = planes + 8 * kb + h;  /* step j = 4kb + s at planes[2j + h] */
            _mm256_store_si256(p, _mm256_and_si256(v, m3));
            _mm256_store_si256(p + 2, _mm256_and_si256(_mm256_srli_epi16(v, 2), m3));
            _mm256_store_si256(p + 4, _mm256_and_si256(_mm256_srli_epi16(v, 4), m3));
            _mm256_store_si256(p + 6, _mm256_and_si256(_mm256_srli_epi16(v, 6), m3));
        }
}

/* acc[i][0..16) += the chunk's sums for activation rows x + i * ldx, i < G (x at the chunk's column) */
INLINE T256 void chunk_group(const int8_t *x, size_t ldx, const __m256i *planes, int nkb, int32_t *acc,
                             const int G) {
    __m256i a0[GROUP], a1[GROUP];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) a0[i] = a1[i] = _mm256_setzero_si256();
#pragma GCC unroll 1  /* one step per iteration: unrolled, the compiler interleaves steps and spills */
    for (int j = 0; j < 4 * nkb; j++) {
        __m256i b0 = _mm256_load_si256(planes + 2 * j), b1 = _mm256_load_si256(planes + 2 * j + 1);
#pragma GCC unroll 4
        for (int i = 0; i < G; i++) {
            __m256i xb = bcast4(x + (size_t)i * ldx + 4 * j);
            a0[i] = _mm256_add_epi16(a0[i], _mm256_maddubs_epi16(b0, xb));
            a1[i] = _mm256_add_epi16(a1[i], _mm256_maddubs_epi16(b1, xb));
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        __m256i *r = (__m256i *)(acc + 16 * i);
        _mm256_store_si256(r, _mm256_add_epi32(_mm256_load_si256(r), _mm256_madd_epi16(a0[i], ones)));
        _mm256_store_si256(r + 1, _mm256_add_epi32(_mm256_load_si256(r + 1), _mm256_madd_epi16(a1[i], ones)));
    }
}

/* The full tile (G = GROUP) in assembly: written in C, the compilers hoist all six broadcasts and
 * spill accumulators, at half the speed. Rows x0, x0 + ldx, x0 + 2ldx, x3 = x0 + 3ldx, ...; ymm0-11
 * are the int16 accumulators (row i: ymm 2i for half 0, 2i + 1 for half 1), ymm12/13 the planes,
 * ymm14 the broadcast, ymm15 the product. At the end the sums are widened into acc[6][16]. */
#define STEP(xaddr, A0, A1)                                                                          \
    "vpbroadcastd " xaddr ", %%ymm14\n\t"                                                          \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"                                                     \
    "vpaddw %%ymm15, %%ymm" A0 ", %%ymm" A0 "\n\t"                                                 \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"                                                     \
    "vpaddw %%ymm15, %%ymm" A1 ", %%ymm" A1 "\n\t"
#define ZERO(A) "vpxor %%ymm" A ", %%ymm" A ", %%ymm" A "\n\t"
#define WIDEN(A, OFF)                                                                                \
    "vpmaddwd %%ymm12, %%ymm" A ", %%ymm" A "\n\t"                                                 \
    "vpaddd " OFF "(%[acc]), %%ymm" A ", %%ymm" A "\n\t"                                           \
    "vmovdqa %%ymm" A ", " OFF "(%[acc])\n\t"

INLINE T256 void chunk_group6(const int8_t *x, size_t ldx, const __m256i *planes, int nkb, int32_t *acc) {
    const int8_t *x0 = x, *x3 = x + 3 * ldx;
    const __m256i *p = planes;
    long n = 4L * nkb;
    __asm__ volatile(
        ZERO("0") ZERO("1") ZERO("2") ZERO("3") ZERO("4") ZERO("5")
        ZERO("6") ZERO("7") ZERO("8") ZERO("9") ZERO("10") ZERO("11")
        "1:\n\t"
        "vmovdqa (%[p]), %%ymm12\n\t"
        "vmovdqa 32(%[p]), %%ymm13\n\t"
        STEP("(%[x0])", "0", "1")
        STEP("(%[x0],%[l],1)", "2", "3")
        STEP("(%[x0],%[l],2)", "4", "5")
        STEP("(%[x3])", "6", "7")
        STEP("(%[x3],%[l],1)", "8", "9")
        STEP("(%[x3],%[l],2)", "10", "11")
        "add $64, %[p]\n\t"
        "add $4, %[x0]\n\t"
        "add $4, %[x3]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vpcmpeqw %%ymm12, %%ymm12, %%ymm12\n\t"
        "vpsrlw $15, %%ymm12, %%ymm12\n\t"  /* int16 ones */
        WIDEN("0", "0") WIDEN("1", "32") WIDEN("2", "64") WIDEN("3", "96") WIDEN("4", "128")
        WIDEN("5", "160") WIDEN("6", "192") WIDEN("7", "224") WIDEN("8", "256") WIDEN("9", "288")
        WIDEN("10", "320") WIDEN("11", "352")
        : [p] "+r"(p), [x0] "+r"(x0), [x3] "+r"(x3), [n] "+r"(n)
        : [l] "r"((long)ldx), [acc] "r"(acc)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}
#undef STEP
#undef ZERO
#undef WIDEN

INLINE T256 void gemm_block_rows(const i2v_gemm_args *a, int rb) {
    const uint8_t *w = a->w + rb * (size_t)a->Kb * I2V_BLOCK;
    __m256i planes[8 * CHUNK];
    int32_t acc[PANEL * 16] __attribute__((aligned(32)));
    for (int p0 = 0; p0 < a->M; p0 += PANEL) {
        int np = a->M - p0 < PANEL ? a->M - p0 : PANEL;
        memset(acc, 0, sizeof(int32_t) * 16 * (size_t)np);
        for (int kb0 = 0; kb0 < a->Kb; kb0 += CHUNK) {
            int nkb = a->Kb - kb0 < CHUNK ? a->Kb - kb0 : CHUNK;
            /* the chunk unpacked next (this row block's next, its first again for the next panel, or
             * the next row block's first) is fetched while this one is multiplied: unpacking waited on
             * it otherwise. Never past the last row block. */
            size_t nx = kb0 + nkb < a->Kb ? (size_t)(kb0 + nkb) : p0 + PANEL < a->M ? 0 : (size_t)a->Kb;
            size_t left = ((size_t)(a->N + I2V_ROWS - 1) / I2V_ROWS - (size_t)rb) * a->Kb - nx;
            const char *next = (const char *)(w + nx * I2V_BLOCK);
            for (size_t i = 0; i < (left < CHUNK ? left : CHUNK) * I2V_BLOCK; i += 64) _mm_prefetch(next + i, _MM_HINT_T0);
            unpack_chunk(w + (size_t)kb0 * I2V_BLOCK, nkb, planes);
            const int8_t *x = a->x + (size_t)p0 * a->ldx + 16 * (size_t)kb0;
            int i = 0;
            for (; i + GROUP <= np; i += GROUP) chunk_group6(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i);
            switch (np - i) {
            case 5: chunk_group(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i, 5); break;
            case 4: chunk_group(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i, 4); break;
            case 3: chunk_group(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i, 3); break;
            case 2: chunk_group(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i, 2); break;
            case 1: chunk_group(x + i * a->ldx, a->ldx, planes, nkb, acc + 16 * i, 1); break;
            default: break;
            }
        }
        for (int m = 0; m < np; m++) {
            store_half(a, p0 + m, rb, 0, _mm256_load_si256((const __m256i *)(acc + 16 * m)));
            store_half(a, p0 + m, rb, 1, _mm256_load_si256((const __m256i *)(acc + 16 * m + 8)));
        }
    }
}

/* Small M (a decode step of a few sequences): the row blocks stream in order (one sequential stream,
 * prefetched PF_DIST blocks ahead as in the GEMV), each block split into its code planes once and
 * applied to MT <= 4 activation rows: int16 accumulators acc[m][half] (8 of the 16 ymm at MT = 4),
 * widened into int32 every CHUNK blocks (the same int16 bound as chunk_group). The prefill kernel
 * unpacks through memory and streams one row block at a time, which cost M = 2 twice M = 1.
 * Measured (13824 x 2560, 2 threads, cold weights, on the Xeon: no Zen 3 at hand): M = 2 0.96 ms against
 * 1.25 (M = 1 0.63), M = 3 even, M >= 4 behind (the prefill kernel's 6-row assembly tile does more per
 * plane load than 4 rows here, and the compute then outweighs the weight reads): only up to SMALL_M. */
#define SMALL_M 2

INLINE T256 void small_tile(const i2v_gemm_args *a, int m0, int rb, const int MT, int pf_on) {
    const uint8_t *w = a->w + rb * (size_t)a->Kb * I2V_BLOCK;
    const int8_t *x = a->x + (size_t)m0 * a->ldx;
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i tot[4][2];  /* int32 sums, in memory between chunks: the registers hold acc */
    memset(tot, 0, sizeof tot);
    for (int kb0 = 0; kb0 < a->Kb; kb0 += CHUNK) {
        int kb1 = a->Kb - kb0 < CHUNK ? a->Kb : kb0 + CHUNK;
        __m256i acc[4][2];
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        for (int kb = kb0; kb < kb1; kb++) {
            const uint8_t *blk = w + (size_t)kb * I2V_BLOCK;
            if (pf_on) _mm_prefetch((const char *)(blk + PF_DIST * I2V_BLOCK), _MM_HINT_T0);
            __m256i v0 = _mm256_loadu_si256((const __m256i *)blk), v1 = _mm256_loadu_si256((const __m256i *)(blk + 32));
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                __m256i c0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2 * s), m3);
                __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2 * s), m3);
#pragma GCC unroll 4
                for (int m = 0; m < MT; m++) {
                    __m256i xb = bcast4(x + (size_t)m * a->ldx + 16 * kb + 4 * s);
                    acc[m][0] = _mm256_add_epi16(acc[m][0], _mm256_maddubs_epi16(c0, xb));
                    acc[m][1] = _mm256_add_epi16(acc[m][1], _mm256_maddubs_epi16(c1, xb));
                }
            }
        }
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) {
            __m256i *t = (__m256i *)(void *)tot[m];
            _mm256_storeu_si256(t, _mm256_add_epi32(_mm256_loadu_si256(t), _mm256_madd_epi16(acc[m][0], ones)));
            _mm256_storeu_si256(t + 1, _mm256_add_epi32(_mm256_loadu_si256(t + 1), _mm256_madd_epi16(acc[m][1], ones)));
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++) {
        store_half(a, m0 + m, rb, 0, _mm256_loadu_si256((const __m256i *)(void *)&tot[m][0]));
        store_half(a, m0 + m, rb, 1, _mm256_loadu_si256((const __m256i *)(void *)&tot[m][1]));
    }
}

T256 void i2v_gemm_avx2(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1) {  /* the row blocks in four quarters, one of each side by side: four long streams */
        int q = (rb1 - rb0) / 4;
        for (int i = 0; i < q; i++) gemv_rows(a, (const int[]){rb0 + i, rb0 + q + i, rb0 + 2 * q + i, rb0 + 3 * q + i}, 4);
        for (int rb = rb0 + 4 * q; rb < rb1; rb++) gemv_rows(a, (const int[]){rb}, 1);
        return;
    }
    if (a->M <= SMALL_M) {
        for (int rb = rb0; rb < rb1; rb++)
            for (int m0 = 0; m0 < a->M; m0 += 4) switch (a->M - m0 < 4 ? a->M - m0 : 4) {
                case 4: small_tile(a, m0, rb, 4, m0 == 0); break;
                case 3: small_tile(a, m0, rb, 3, m0 == 0); break;
                case 2: small_tile(a, m0, rb, 2, m0 == 0); break;
                default: small_tile(a, m0, rb, 1, m0 == 0); break;
                }
        return;
    }
    for (int rb = rb0; rb < rb1; rb++) gemm_block_rows(a, rb);
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

/* Q6 rows (formats/q6.py), 16 codes per ymm: every 3 bytes hold 4 codes (bits 0-5, 6-11, 12-17,
 * 18-23 of a little-endian 24-bit value). A 128-bit lane takes 6 bytes (8 codes): vpshufb puts in
 * word j the bytes holding code j (b0b1, b0b1, b1b2 and b2 alone per 3 bytes, where code j sits at
 * bit s_j = 0, 6, 4, 2) and a mask keeps its 6 bits there, code << s_j. The activations are made once
 * per call (i2v_q6_avx2_x16) as x << (6 - s_j), so vpmaddwd sums code * x * 64: no shifts in the loop,
 * 4 vector operations per 16 codes (a shuffle, a mask, a multiply-add, an add), 21% more codes per
 * second than the multiply-and-shift extraction it replaces, in L2 (a throwaway harness). Bounds: a
 * product is at most 63 * 128 * 64 in magnitude and a lane takes 8 per 64 columns, so the int32 lanes
 * are divided by 64 (exactly: every product is a multiple of 64) and emptied every Q6_FLUSH groups. */
#define Q6_FLUSH 256  /* groups: 256 * 8 * 63 * 128 * 64 < 2^31 */

void i2v_q6_avx2_x16(const int8_t *x, size_t ldx, int M, size_t hp, int16_t *x16) {
    static const int scale[4] = {1 << 6, 1 << 0, 1 << 2, 1 << 4};  /* 2^(6 - s_j), j = column mod 4 */
    for (int m = 0; m < M; m++)
        for (size_t k = 0; k < hp; k++) x16[(size_t)m * hp + k] = (int16_t)(x[(size_t)m * ldx + k] * scale[k & 3]);
}

/* 8 int32 lanes of code * x * 64 over the 64 columns of one group */
INLINE T256 __m256i q6_group(const uint8_t *p, const int16_t *xg, __m256i idx, __m256i idx3, __m256i mask) {
#define Q6_CODES(ptr, ix) _mm256_and_si256(_mm256_shuffle_epi8(                                          \
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(ptr))), ix), mask)
    __m256i s = _mm256_madd_epi16(Q6_CODES(p, idx), _mm256_loadu_si256((const __m256i *)xg));
    s = _mm256_add_epi32(s, _mm256_madd_epi16(Q6_CODES(p + 12, idx), _mm256_loadu_si256((const __m256i *)(xg + 16))));
    s = _mm256_add_epi32(s, _mm256_madd_epi16(Q6_CODES(p + 24, idx), _mm256_loadu_si256((const __m256i *)(xg + 32))));
    return _mm256_add_epi32(s, _mm256_madd_epi16(Q6_CODES(p + 32, idx3), _mm256_loadu_si256((const __m256i *)(xg + 48))));
#undef Q6_CODES
}

#define Q6_PF 24 /* groups of software prefetch ahead (1152 bytes), as avx512vbmi.c */

/* out[m, v[r]] for NR (1 to 4) rows read side by side */
INLINE T256 void q6_rows(const i2v_q6_args *a, int m, const int *v, const int NR) {
    const __m256i idx = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 2, -1, 3, 4, 3, 4, 4, 5, 5, -1,
                                         6, 7, 6, 7, 7, 8, 8, -1, 9, 10, 9, 10, 10, 11, 11, -1);
    /* the last 12 bytes of a group are loaded from 4 bytes early (no read past the row) */
    const __m256i idx3 = _mm256_add_epi8(idx, _mm256_setr_epi8(4, 4, 4, 4, 4, 4, 4, 0, 4, 4, 4, 4, 4, 4, 4, 0,
                                                               4, 4, 4, 4, 4, 4, 4, 0, 4, 4, 4, 4, 4, 4, 4, 0));
    const __m256i mask = _mm256_setr_epi16(0x3F, 0xFC0, 0x3F0, 0xFC, 0x3F, 0xFC0, 0x3F0, 0xFC,
                                           0x3F, 0xFC0, 0x3F0, 0xFC, 0x3F, 0xFC0, 0x3F0, 0xFC);
    const int ng = (a->H + 63) / 64;
    const int16_t *x16 = a->x16 + (size_t)m * 64 * ng;
    const uint8_t *row[4];
    __m256i total[4];
    for (int r = 0; r < NR; r++) {
        row[r] = a->w + (size_t)v[r] * ng * 48;
        total[r] = _mm256_setzero_si256();
    }
    for (int g0 = 0; g0 < ng; g0 += Q6_FLUSH) {
        int g1 = ng - g0 < Q6_FLUSH ? ng : g0 + Q6_FLUSH;
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int g = g0; g < g1; g++)
            for (int r = 0; r < NR; r++) {
                /* on into the quarter's next row past this one's end, as the AVX-512 head kernel */
                _mm_prefetch((const char *)(row[r] + (size_t)(g + Q6_PF) * 48), _MM_HINT_T0);
                acc[r] = _mm256_add_epi32(acc[r], q6_group(row[r] + (size_t)g * 48, x16 + 64 * g, idx, idx3, mask));
            }
        for (int r = 0; r < NR; r++) total[r] = _mm256_add_epi32(total[r], _mm256_srai_epi32(acc[r], 6));
    }
    for (int r = 0; r < NR; r++) {
        __m128i q = _mm_add_epi32(_mm256_castsi256_si128(total[r]), _mm256_extracti128_si256(total[r], 1));
        q = _mm_hadd_epi32(q, q);
        q = _mm_hadd_epi32(q, q);
        a->out[(size_t)m * a->ldo + v[r]] = _mm_cvtsi128_si32(q) - 32 * a->xsum[m];
    }
}

/* The rows in four quarters, row i of each side by side: four streams from memory, which this core
 * reads faster than one. One row at a time, the head took 10.4 ms of a 2B4T decode step at 2 threads;
 * two streams 9.3, four 8.7 (medians of six alternating runs of each build: a throwaway A/B). */
T256 void i2v_q6_avx2(const i2v_q6_args *a, int v0, int v1) {
    int q = (v1 - v0) / 4;
    for (int m = 0; m < a->M; m++) {
        for (int i = 0; i < q; i++) q6_rows(a, m, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) q6_rows(a, m, (const int[]){v}, 1);
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
/* ==== T5, the 1.6-bit layout (formats/t5.py) ==========================================================
 * A ymm takes half a block (rows 0..7 or 8..15) as for I2V.
 *
 * Decode (M = 1) never isolates a digit. With F_j = floor(3^j q / 256) (F_0 = 0; F_5 <= 242), the
 * identities 3^j q = 256 F_j + y_j and 3 y_j = 256 t_j + y_{j+1} give t_j = F_{j+1} - 3 F_j exactly, for
 * any byte q, so a byte's five products are
 *     sum_j x[4j+i] t_j = sum_{j=1..5} F_j c_j,   c_j = x[4(j-1)+i] - 3 x[4j+i]   (x[20+i] read as 0)
 * F_j of 16 bytes at once is vpmulhuw of (q << 8) by 3^j (the even bytes of a 16-bit lane shifted up,
 * the odd ones masked), and vpmaddwd multiplies it by the int16 pair (|c_j| <= 511) of the lane's two
 * columns and adds the two products into the row's int32 lane: two multiplies per digit and 16 bytes,
 * where extracting the digit by comparisons cost five ALU operations before its vpmaddubsw (the T5
 * projections ran 1.26x faster at 1 thread and 1.13x at 2 on Zen 3, benchmarks/README.md). The pairs
 * depend on the activations only: t5_avx2_coefs makes them once a call, broadcast, as T5_COEFS ymm a block:
 *     coefs[10 kb + 2 (j-1) + h]   pair (c_j of byte i = h, c_j of byte i = h+2) of a lane, h = 0 even, 1 odd
 *
 * Prefill (M > 1) extracts the digits once per chunk of blocks into planes, t_j = (y_j >= 86) + (y_j >= 171)
 * (each comparison as min(y - c saturated, 1): AVX2 has no unsigned byte compare), y_{j+1} = 3 y_j mod 256
 * by two byte adds, and vpmaddubsw multiplies them with the broadcast x[20kb + 4j .. +3]. (The raw bytes
 * cannot go to vpmaddubsw as on AVX-512: 2 * 255 * 128 saturates its int16 pairs.) int16 bound: the 5
 * steps of a block sum to at most 5 * 2 * 2 * 128 = 2560 before they are widened to int32, once per block. */
INLINE T256 __m256i t5_digit(__m256i y, __m256i one, __m256i c85, __m256i c170) {
    return _mm256_add_epi8(_mm256_min_epu8(_mm256_subs_epu8(y, c85), one),
                           _mm256_min_epu8(_mm256_subs_epu8(y, c170), one));
}

INLINE T256 __m256i t5_times3(__m256i y) { return _mm256_add_epi8(y, _mm256_add_epi8(y, y)); }

size_t t5_avx2_coefs_bytes(int Kb) { return (size_t)Kb * T5_COEFS * sizeof(__m256i); }

T256 void t5_avx2_coefs(const int8_t *x, int Kb, void *out) {
    __m256i *o = (__m256i *)out;
    for (int kb = 0; kb < Kb; kb++) {
        const int8_t *xk = x + (size_t)kb * T5_COLS;
        for (int j = 1; j <= 5; j++)
            for (int h = 0; h < 2; h++) {
                int c0 = xk[4 * (j - 1) + h] - 3 * (j < 5 ? xk[4 * j + h] : 0);
                int c1 = xk[4 * (j - 1) + h + 2] - 3 * (j < 5 ? xk[4 * j + h + 2] : 0);
                o[(size_t)kb * T5_COEFS + 2 * (j - 1) + h] =
                    _mm256_set1_epi32((int32_t)(((uint32_t)(uint16_t)c1 << 16) | (uint16_t)c0));
            }
    }
}

/* Decode: two row blocks side by side share the coefficient loads */
INLINE T256 void t5_gemv_rows(const i2v_gemm_args *a, int rb, const int NR) {
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const __m256i *coefs = (const __m256i *)a->coefs, hi8 = _mm256_set1_epi16((short)0xFF00);
    static const short pow3[5] = {3, 9, 27, 81, 243};
    __m256i acc[2][2];
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int kb = 0; kb < a->Kb; kb++) {
        const __m256i *c = coefs + (size_t)kb * T5_COEFS;
#pragma GCC unroll 2
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = a->w + (rb + r) * stride + (size_t)kb * I2V_BLOCK;
            _mm_prefetch((const char *)(blk + PF_DIST * I2V_BLOCK), _MM_HINT_T0);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 32 * h));
                __m256i qe = _mm256_slli_epi16(q, 8), qo = _mm256_and_si256(q, hi8);
                __m256i se = acc[r][h], so = _mm256_setzero_si256();
#pragma GCC unroll 5
                for (int j = 0; j < 5; j++) {
                    __m256i p3 = _mm256_set1_epi16(pow3[j]);
                    se = _mm256_add_epi32(se, _mm256_madd_epi16(_mm256_mulhi_epu16(qe, p3), c[2 * j]));
                    so = _mm256_add_epi32(so, _mm256_madd_epi16(_mm256_mulhi_epu16(qo, p3), c[2 * j + 1]));
                }
                acc[r][h] = _mm256_add_epi32(se, so);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < NR; r++) {
        store_half(a, 0, rb + r, 0, acc[r][0]);
        store_half(a, 0, rb + r, 1, acc[r][1]);
    }
}

/* Prefill (M > 1): a row block's codes decoded once per chunk of T5_CH blocks into planes (plane j of
 * half h of block kb at planes[10 kb + 2 j + h]), then every activation row runs over the chunk. */
#define T5_CH 16

T256 void t5_gemm_avx2(const i2v_gemm_args *a, int rb0, int rb1) {
    if (a->M == 1 && a->coefs) {  /* without the coefficients (not made: out of memory), the prefill loop */
        int rb = rb0;
        for (; rb + 2 <= rb1; rb += 2) t5_gemv_rows(a, rb, 2);
        for (; rb < rb1; rb++) t5_gemv_rows(a, rb, 1);
        return;
    }
    const size_t stride = (size_t)a->Kb * I2V_BLOCK;
    const __m256i one = _mm256_set1_epi8(1), c85 = _mm256_set1_epi8(85), c170 = _mm256_set1_epi8((char)170),
                  ones = _mm256_set1_epi16(1);
    __m256i planes[T5_CH * 10];
    for (int rb = rb0; rb < rb1; rb++) {
        for (int m0 = 0; m0 < a->M; m0 += 64) {  /* a panel of 64 rows: their sums in acc */
            int pm = a->M - m0 < 64 ? a->M - m0 : 64;
            __m256i acc[64][2];
            for (int m = 0; m < pm; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
            for (int k0 = 0; k0 < a->Kb; k0 += T5_CH) {
                int nkb = a->Kb - k0 < T5_CH ? a->Kb - k0 : T5_CH;
                for (int kb = 0; kb < nkb; kb++)
                    for (int h = 0; h < 2; h++) {
                        __m256i y = _mm256_loadu_si256(
                            (const __m256i *)(a->w + rb * stride + (size_t)(k0 + kb) * I2V_BLOCK + 32 * h));
                        for (int j = 0; j < 5; j++) {
                            planes[10 * kb + 2 * j + h] = t5_digit(y, one, c85, c170);
                            y = t5_times3(y);
                        }
                    }
                for (int m = 0; m < pm; m++) {
                    const int8_t *xk = a->x + (size_t)(m0 + m) * a->ldx + (size_t)k0 * T5_COLS;
                    __m256i a0 = acc[m][0], a1 = acc[m][1];
                    for (int kb = 0; kb < nkb; kb++) {
                        __m256i p0 = _mm256_setzero_si256(), p1 = p0;
#pragma GCC unroll 5
                        for (int j = 0; j < 5; j++) {
                            __m256i xb = bcast4(xk + kb * T5_COLS + 4 * j);
                            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(planes[10 * kb + 2 * j], xb));
                            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(planes[10 * kb + 2 * j + 1], xb));
                        }
                        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(p0, ones));
                        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(p1, ones));
                    }
                    acc[m][0] = a0, acc[m][1] = a1;
                }
            }
            for (int m = 0; m < pm; m++) {
                store_half(a, m0 + m, rb, 0, acc[m][0]);
                store_half(a, m0 + m, rb, 1, acc[m][1]);
            }
        }
    }
}

#endif
