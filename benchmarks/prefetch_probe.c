/* A compute-heavy stream from DRAM, with and without software prefetch: lines of 64 bytes read in order
 * (16 int8 widened to float each), K FMAs on each (16 independent accumulators), and a prefetcht1 one line
 * at a time D lines ahead (D = 0: none). The stream is 1 GB on 2 MB pages, read once a pass; the same loop
 * over 512 KB (L2) gives the arithmetic's own rate. benchmarks/README.md (eighth session): on the Xeon a
 * loop with K = 16 read 9.2 GB/s from DRAM without requests and 16.4 at D = 32, near its 22 in L2, which is
 * why kvops.c's kernels request lines spread over their work rather than in bursts. x86 with AVX-512F
 * only. Never part of the tests.
 *
 *   gcc -O3 -mavx512f -mavx512bw -mfma benchmarks/prefetch_probe.c -o /tmp/prefetch_probe && /tmp/prefetch_probe
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define STREAM(K)                                                                                            \
    static float stream##K(const unsigned char *p, size_t n, int d) {                                      \
        __m512 a[16];                                                                                        \
        for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();                                             \
        const __m512 w = _mm512_set1_ps(1.0001f);                                                            \
        for (size_t i = 0; i < n; i += 64) {                                                                 \
            if (d) _mm_prefetch((const char *)p + i + 64 * (size_t)d, _MM_HINT_T1);                          \
            __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(p + i)))); \
            if (K == 0) a[0] = _mm512_add_ps(a[0], x);                                                       \
            for (int k = 0; k < K; k++) a[k % 16] = _mm512_fmadd_ps(w, x, a[k % 16]);                       \
        }                                                                                                    \
        __m512 s = a[0];                                                                                     \
        for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, a[i]);                                             \
        return _mm512_reduce_add_ps(s);                                                                      \
    }
STREAM(0)
STREAM(8)
STREAM(16)

int main(void) {
    const size_t n = (size_t)1 << 30, huge = (size_t)1 << 21, l2 = (size_t)1 << 19;
    unsigned char *p = aligned_alloc(huge, n);
    if (!p) return 1;
    madvise(p, n, MADV_HUGEPAGE);
    memset(p, 1, n);
    float (*fn[3])(const unsigned char *, size_t, int) = {stream0, stream8, stream16};
    const int ks[3] = {0, 8, 16}, ds[3] = {0, 16, 32};
    float sink = 0;
    for (int k = 0; k < 3; k++)
        for (int di = 0; di < 3; di++) {
            double dram = 1e9, cache = 1e9;
            for (int r = 0; r < 2; r++) { /* best of 2 passes over 1 GB */
                double t = now();
                sink += fn[k](p, n, ds[di]);
                t = now() - t;
                dram = t < dram ? t : dram;
            }
            for (int r = 0; r < 3; r++) { /* best of 3 x 200 passes over 512 KB */
                double t = now();
                for (int x = 0; x < 200; x++) sink += fn[k](p, l2, ds[di]);
                t = now() - t;
                cache = t < cache ? t : cache;
            }
            printf("FMAs a line %2d, prefetch %2d lines ahead: DRAM %5.2f GB/s, L2 %5.2f GB/s\n", ks[k], ds[di],
                   n / dram / 1e9, 200.0 * l2 / cache / 1e9);
        }
    free(p);
    return sink == 42.0f; /* keeps the sums live */
}
