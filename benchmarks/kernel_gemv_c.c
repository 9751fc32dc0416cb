/* The ternary GEMV from C, without Python's per-call overhead (what a C runtime such as bitnet.c
 * sees): each 2B4T shape on cold weights (a 2 GB pool of copies), paired with the library's read
 * probe over the same pool, as benchmarks/kernel_gemv.py does. Never part of the tests.
 *
 *   K=src/bitlm/kernels; gcc -O2 -std=c11 -I$K benchmarks/kernel_gemv_c.c $K/dispatch.c $K/pool.c \
 *       $K/scalar.c $K/avx2.c $K/avx512vnni.c $K/avx512vbmi.c $K/amx.c $K/neon.c $K/convert.c \
 *       -o /tmp/kernel_gemv_c -lpthread -lm && /tmp/kernel_gemv_c 1 && /tmp/kernel_gemv_c 2
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "i2v.h"

#define REPEATS 7

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    i2v_pool_set_threads(threads);
    static const int shapes[4][2] = {{2560, 2560}, {2560, 640}, {2560, 6912}, {6912, 2560}};  /* in, out */
    size_t pool = (size_t)2 << 30;
    uint8_t *buf = malloc(pool);
    if (!buf) return 1;
    for (size_t i = 0; i < pool; i++) buf[i] = (uint8_t)(0x55 ^ (i * 7));  /* any bytes time the same */
    printf("path %s, %d thread(s)\n%12s %9s %8s %8s\n", i2v_path_name(i2v_best_path()), i2v_pool_threads(),
           "in->out", "us/call", "GB/s", "% of BW");
    for (int s = 0; s < 4; s++) {
        int K = shapes[s][0], N = shapes[s][1];
        size_t bytes = (size_t)((N + 15) / 16) * ((K + 15) / 16) * 64, copies = pool / bytes;
        int8_t *x = malloc((size_t)K);
        int32_t *y = malloc((size_t)N * 4), xsum = 0;
        for (int k = 0; k < K; k++) xsum += x[k] = (int8_t)(k * 13);
        double t_call[REPEATS], ratio[REPEATS];
        for (int r = 0; r < REPEATS; r++) {  /* probe and GEMV pass alternate: same background load */
            double t0 = now();
            i2v_read_bytes(buf, copies * bytes);
            double t1 = now();
            for (size_t c = 0; c < copies; c++) i2v_gemm(x, (size_t)K, &xsum, 1, K, buf + c * bytes, N, y, (size_t)N, -1);
            double t2 = now();
            t_call[r] = (t2 - t1) / copies;
            ratio[r] = (t1 - t0) / (t2 - t1);
        }
        qsort(t_call, REPEATS, sizeof(double), cmp);
        qsort(ratio, REPEATS, sizeof(double), cmp);
        double t = t_call[REPEATS / 2];
        printf("%5d->%-6d %9.1f %8.1f %7.0f%%\n", K, N, t * 1e6, bytes / t / 1e9, 100 * ratio[REPEATS / 2]);
        free(x);
        free(y);
    }
    free(buf);
    return 0;
}
