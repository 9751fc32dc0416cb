/* AVX-512 VBMI path for Q6 rows (formats/q6.py), the 6-bit output head.
 *
 * A row's 48-byte group holds 64 codes as 8 pieces of 6 bytes. vpermb moves piece L to qword L, and
 * vpmultishiftqb with shifts 0, 6, ..., 42 puts code 8L+j in byte j of qword L; & 63 leaves the
 * 64 codes in column order, and vpdpbusd multiplies them (unsigned) with 64 consecutive int8
 * activations. Four rows share each activation load; one horizontal sum per row at the end. */
#if defined(__x86_64__) || defined(__i386__)

#include "i2v.h"
#include "x86_avx512.h"  /* <immintrin.h>, or SIMDe's portable intrinsics with -DI2V_SIMDE */

#define TVBMI I2V_TARGET("avx512f,avx512bw,avx512vnni,avx512vbmi")
#define INLINE static inline __attribute__((always_inline))
/* groups of software prefetch ahead in each row (1152 bytes): the head GEMV read 84-86% of the paired
 * probe's bandwidth at 8, 91% at 16, 93-95% at 24, 91-93% at 32 and 88-91% at 48 (2 threads, cold head
 * copies, three alternating runs; benchmarks/README.md) */
#define Q6_PF 24

INLINE TVBMI __m512i q6_codes(const uint8_t *g, __m512i spread, __m512i shifts, __m512i m63) {
    __m512i v = _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFFFFFull, g);  /* 48 bytes, no over-read */
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(spread, v)), m63);
}

INLINE TVBMI void q6_rows(const i2v_q6_args *a, int m, const int *v, const int NR) {
    const int ng = (a->H + 63) / 64;
    const size_t row_bytes = (size_t)ng * 48;
    /* byte 8L + j <- byte 6L + j (j < 6; bytes 6, 7 of a qword are never shifted into codes) */
    static const uint8_t spread_idx[64] = {
        0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11, 11, 12, 13, 14, 15, 16, 17, 17, 17,
        18, 19, 20, 21, 22, 23, 23, 23, 24, 25, 26, 27, 28, 29, 29, 29, 30, 31, 32, 33, 34, 35, 35, 35,
        36, 37, 38, 39, 40, 41, 41, 41, 42, 43, 44, 45, 46, 47, 47, 47};
    const __m512i spread = _mm512_loadu_si512((const void *)spread_idx);
    const __m512i shifts = _mm512_set1_epi64(0x2A241E18120C0600ll);  /* 42 36 30 24 18 12 6 0 */
    const __m512i m63 = _mm512_set1_epi8(63);
    const int8_t *x = a->x + (size_t)m * a->ldx;
    const uint8_t *w[4];
    __m512i acc[4];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        w[r] = a->w + (size_t)v[r] * row_bytes;
        acc[r] = _mm512_setzero_si512();
    }
    for (int g = 0; g < ng; g++) {
        __m512i xv = _mm512_loadu_si512((const void *)(x + 64 * g));
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = w[r] + (size_t)g * 48;
            _mm_prefetch((const char *)(p + Q6_PF * 48), _MM_HINT_T0);  /* on into the quarter's next row */
            acc[r] = _mm512_dpbusd_epi32(acc[r], q6_codes(p, spread, shifts, m63), xv);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++)
        a->out[(size_t)m * a->ldo + v[r]] = _mm512_reduce_add_epi32(acc[r]) - 32 * a->xsum[m];
}

/* Several activation rows (a batch's decode step): a tile of MT rows x NR head rows. Each 48-byte group
 * of the NR head rows is decoded once and applied to all MT activation rows (MT * NR accumulators,
 * at most 16 zmm); M = 8 decoded each group 8 times row by row. */
INLINE TVBMI void q6_tile(const i2v_q6_args *a, int m0, int v0, const int MT, const int NR) {
    const int ng = (a->H + 63) / 64;
    const size_t row_bytes = (size_t)ng * 48;
    static const uint8_t spread_idx[64] = {
        0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11, 11, 12, 13, 14, 15, 16, 17, 17, 17,
        18, 19, 20, 21, 22, 23, 23, 23, 24, 25, 26, 27, 28, 29, 29, 29, 30, 31, 32, 33, 34, 35, 35, 35,
        36, 37, 38, 39, 40, 41, 41, 41, 42, 43, 44, 45, 46, 47, 47, 47};
    const __m512i spread = _mm512_loadu_si512((const void *)spread_idx);
    const __m512i shifts = _mm512_set1_epi64(0x2A241E18120C0600ll);
    const __m512i m63 = _mm512_set1_epi8(63);
    const int8_t *x = a->x + (size_t)m0 * a->ldx;
    const uint8_t *w = a->w + (size_t)v0 * row_bytes;
    __m512i acc[4][4];
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_si512();
    for (int g = 0; g < ng; g++) {
        const size_t pf = Q6_PF * 48 + (g + Q6_PF >= ng ? (size_t)(NR - 1) * row_bytes : 0);
        __m512i c[4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = w + r * row_bytes + (size_t)g * 48;
            if (m0 == 0) _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            c[r] = q6_codes(p, spread, shifts, m63);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + (size_t)m * a->ldx + 64 * g));
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], c[r], xv);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            a->out[(size_t)(m0 + m) * a->ldo + v0 + r] = _mm512_reduce_add_epi32(acc[m][r]) - 32 * a->xsum[m0 + m];
}

#define Q6_TILE_CASES(V, NR)                          \
    switch (mt) {                                     \
    case 4: q6_tile(a, m0, V, 4, NR); break;          \
    case 3: q6_tile(a, m0, V, 3, NR); break;          \
    case 2: q6_tile(a, m0, V, 2, NR); break;          \
    default: q6_tile(a, m0, V, 1, NR); break;         \
    }

TVBMI void i2v_q6_avx512vbmi(const i2v_q6_args *a, int v0, int v1) {
    if (a->M == 1) { /* the rows in four quarters, row i of each side by side: four long streams */
        int q = (v1 - v0) / 4;
        for (int i = 0; i < q; i++) q6_rows(a, 0, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) q6_rows(a, 0, (const int[]){v}, 1);
        return;
    }
    /* head rows in groups of 4 outer: their 4 * 48 * ng bytes stay in L1 across the tiles of 4
     * activation rows */
    for (int v = v0; v < v1; v += 4) {
        for (int m0 = 0; m0 < a->M; m0 += 4) {
            int mt = a->M - m0 < 4 ? a->M - m0 : 4;
            if (v + 4 <= v1) {
                Q6_TILE_CASES(v, 4)
            } else {
                for (int vv = v; vv < v1; vv++) Q6_TILE_CASES(vv, 1)
            }
        }
    }
}
#endif
