/* The ceiling of an AVX2 int8 GEMM on this core: how many vpmaddubsw (each added into an int16
 * accumulator with vpaddw, the inner step of every AVX2 int8 GEMM) it issues per second, measured with
 * 12 independent chains so that only the execution ports limit them. Every vpmaddubsw is 32 byte
 * products summed in pairs: 32 multiply-adds. Built as a shared library and called through ctypes by
 * benchmarks/prefill_bound.py, alternately with bitlm's GEMM, so that both see the same neighbours.
 *
 *   issue_seconds(which, n): seconds for n iterations of loop `which`:
 *     0  a chain of 4 dependent scalar adds (4 cycles: gives the clock)
 *     1  12 vpmaddubsw                    2  12 vpaddw
 *     3  12 vpmaddubsw + vpaddw pairs     4  one step of the AVX2 prefill tile (kernels/avx2.c
 *        chunk_group6): 2 plane loads, 6 activation broadcasts, 12 vpmaddubsw + vpaddw pairs
 */
#define _POSIX_C_SOURCE 199309L
#include <time.h>

#if !defined(__x86_64__)
double issue_seconds(int which, long n) { (void)which; (void)n; return -1.0; }
#else
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
                "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"
#define MADD(A) "vpmaddubsw %%ymm14, %%ymm12, %%ymm" A "\n\t"
#define ADD(A) "vpaddw %%ymm14, %%ymm" A ", %%ymm" A "\n\t"
#define PAIR_P(P, A) "vpmaddubsw %%ymm14, %%ymm" P ", %%ymm15\n\t vpaddw %%ymm15, %%ymm" A ", %%ymm" A "\n\t"
#define PAIR(A) PAIR_P("12", A)
#define TWELVE(M) M("0") M("1") M("2") M("3") M("4") M("5") M("6") M("7") M("8") M("9") M("10") M("11")
#define BCAST(OFF) "vpbroadcastd " OFF "(%[x]), %%ymm14\n\t"

#define LOOP(body)                                                                                   \
    __asm__ volatile("vpxor %%ymm12, %%ymm12, %%ymm12\n\t vpxor %%ymm14, %%ymm14, %%ymm14\n\t"      \
                     "1:\n\t" body "dec %[n]\n\t jnz 1b"                                            \
                     : [n] "+r"(n) : [x] "r"(buf), [p] "r"(buf) : CLOBBER)

double issue_seconds(int which, long n) {
    static int buf[64] __attribute__((aligned(64)));
    long x = 0;
    double t = now();
    switch (which) {
    case 0: __asm__ volatile("1: addq $1, %0\n\t addq $1, %0\n\t addq $1, %0\n\t addq $1, %0\n\t"
                             "decq %1\n\t jnz 1b" : "+r"(x), "+r"(n)); break;
    case 1: LOOP(TWELVE(MADD)); break;
    case 2: LOOP(TWELVE(ADD)); break;
    case 3: LOOP(TWELVE(PAIR)); break;
    case 4: LOOP("vmovdqa (%[p]), %%ymm12\n\t vmovdqa 32(%[p]), %%ymm13\n\t"
                 BCAST("0") PAIR("0") PAIR_P("13", "1") BCAST("4") PAIR("2") PAIR_P("13", "3")
                 BCAST("8") PAIR("4") PAIR_P("13", "5") BCAST("12") PAIR("6") PAIR_P("13", "7")
                 BCAST("16") PAIR("8") PAIR_P("13", "9") BCAST("20") PAIR("10") PAIR_P("13", "11")); break;
    default: return -1.0;
    }
    return now() - t;
}
#endif
