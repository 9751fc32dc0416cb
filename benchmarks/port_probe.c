/* Vector instruction throughput of one core: 12 independent chains of one instruction, in G instructions a
 * second. The ceiling the attention loops (kvops.c) and the GEMV kernels are measured against in
 * benchmarks/README.md. Build it at -O3 with unrolling: at -O2 GCC keeps the 12 accumulators in memory and
 * the chains run at store-forwarding speed (a fifth of the real rate, the mistake of an earlier probe).
 * x86 with AVX-512 VNNI only. Never part of the tests.
 *
 *   gcc -O3 -funroll-loops benchmarks/port_probe.c -o /tmp/port_probe && /tmp/port_probe
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define ITERS 100000000L
#define CHAINS(NAME, T, INIT, OP)                                                                            \
    __attribute__((target("avx512f,avx512bw,avx512vnni,fma"), noinline)) static void NAME(void) {          \
        T a[12], x = INIT, y = INIT;                                                                        \
        (void)y;                                                                                            \
        for (int i = 0; i < 12; i++) a[i] = INIT;                                                           \
        double t = now();                                                                                   \
        for (long it = 0; it < ITERS; it++) {                                                               \
            for (int i = 0; i < 12; i++) a[i] = OP;                                                         \
            __asm__ volatile("" ::"v"(a[0]), "v"(a[1]), "v"(a[2]), "v"(a[3]), "v"(a[4]), "v"(a[5]), "v"(a[6]), \
                             "v"(a[7]), "v"(a[8]), "v"(a[9]), "v"(a[10]), "v"(a[11]));                       \
        }                                                                                                   \
        printf("%-28s %.2f G a second\n", #NAME, ITERS * 12.0 / (now() - t) / 1e9);                         \
    }

CHAINS(vfmadd231ps_zmm, __m512, _mm512_set1_ps(1.0f), _mm512_fmadd_ps(a[i], x, y))
CHAINS(vfmadd231ps_ymm, __m256, _mm256_set1_ps(1.0f), _mm256_fmadd_ps(a[i], x, y))
CHAINS(vaddps_zmm, __m512, _mm512_set1_ps(1.0f), _mm512_add_ps(a[i], x))
CHAINS(vpdpbusd_zmm, __m512i, _mm512_set1_epi32(1), _mm512_dpbusd_epi32(a[i], x, y))
CHAINS(vpaddd_zmm, __m512i, _mm512_set1_epi32(1), _mm512_add_epi32(a[i], x))

int main(void) {
    vfmadd231ps_zmm();
    vfmadd231ps_ymm();
    vaddps_zmm();
    vpdpbusd_zmm();
    vpaddd_zmm();
    return 0;
}
