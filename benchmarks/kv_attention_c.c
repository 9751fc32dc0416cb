/* Attention's loops over the KV cache from C (kvops.c's scores and p.v, as attention.c calls them per
 * 256-key chunk): one decode row of the 2B4T shape (5 kv heads of 4 q heads, head_dim 128) over `keys`
 * keys of each kv head, in bytes of K and V read a second. With few keys the cache stays in L2 and the
 * rate is the loops' arithmetic; with many it comes from memory (more than the L3 holds: 1048576 keys
 * are 1.4 GB of q8_0). Best of `reps` passes. Never part of the tests. Build at -O3 as setup.py builds the
 * runtime: at -O2 the scores' accumulators stay on the stack and the loops run 1.5-2x slower. q8_0 keys
 * are laid out in tiles of 16 and scored as integers, as the runtime does (kvops.c). K and V live on 2 MB
 * pages as the runtime's cache does (engine/native.py; SMALL_PAGES=1 in the environment: on 4 KB pages).
 *
 *   K=src/bitlm/kernels; gcc -O3 -std=c11 -I$K benchmarks/kv_attention_c.c $K/kvops.c $K/dispatch.c \
 *       $K/pool.c $K/scalar.c $K/avx2.c $K/avx512vnni.c $K/avx512vbmi.c $K/amx.c $K/neon.c $K/convert.c \
 *       -o /tmp/kv_attention_c -lpthread -lm
 *   for kv in f16 q8_0; do for n in 256 4000; do /tmp/kv_attention_c $kv $n 100; done; done
 *   /tmp/kv_attention_c q8_0 1048576 2; /tmp/kv_attention_c q8_0 1048576 2 read  # also: scores, pv alone
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "bitnet_impl.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* n bytes read 128 at a time into 4 AVX2 accumulators, one stream: a plain read (x86 only; elsewhere the
 * "read" mode is refused) */
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) static uint64_t read_bytes(const uint8_t *p, size_t n) {
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    size_t i = 0;
    for (; i + 128 <= n; i += 128)
        for (int x = 0; x < 4; x++) a[x] = _mm256_xor_si256(a[x], _mm256_loadu_si256((const __m256i *)(p + i + 32 * x)));
    __m256i t = _mm256_xor_si256(_mm256_xor_si256(a[0], a[1]), _mm256_xor_si256(a[2], a[3]));
    uint64_t s = (uint64_t)_mm256_extract_epi64(t, 0) ^ (uint64_t)_mm256_extract_epi64(t, 3);
    for (; i < n; i++) s += p[i];
    return s;
}
#define HAVE_READ 1
#else
static uint64_t read_bytes(const uint8_t *p, size_t n) { return (void)p, (void)n, 0; }
#define HAVE_READ 0
#endif

/* attention.c's prefetch_run for a run of n rows from row: its first ATT_PREFETCH rows */
__attribute__((always_inline)) static inline void prefetch_first(const uint8_t *row, size_t ld, int n) {
    n = n < ATT_PREFETCH ? n : ATT_PREFETCH;
    for (size_t b = 0; b < (size_t)n * ld; b += 64) __builtin_prefetch(row + b, 0, 3);
}

/* n bytes for K or V, on 2 MB pages unless SMALL_PAGES is set (as the runtime's cache: engine/native.py) */
static uint8_t *cache_bytes(size_t n) {
    size_t huge = (size_t)1 << 21;
    n = (n + huge - 1) / huge * huge;
    uint8_t *p = aligned_alloc(huge, n);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const char *small = getenv("SMALL_PAGES");
    if (p && !(small && *small)) madvise(p, n, MADV_HUGEPAGE);
#endif
    return p;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s {f32,f16,q8_0} KEYS REPS [scores, pv or read]\n", argv[0]);
        return 2;
    }
    int kind = !strcmp(argv[1], "f16") ? BN_F16 : !strcmp(argv[1], "q8_0") ? BN_Q8_0 : BN_F32;
    long keys = atol(argv[2]);
    if (kind == BN_Q8_0) keys = keys < BN_KT ? BN_KT : keys / BN_KT * BN_KT; /* q8_0 keys: whole tiles (kvops.c) */
    int reps = atoi(argv[3]), hd = 128, nq = 4, nkv = 5;
    size_t ld = bn_kv_row_bytes(kind, hd), bytes = (size_t)keys * nkv * ld;
    scores_fn sc;
    pv_fn pv;
    kvput_fn put;
    const char *name = bn_pick_kv(i2v_best_path(), kind, hd, &sc, &pv, &put);
    uint8_t *k = cache_bytes(bytes), *v = cache_bytes(bytes);
    float x[128], q[4 * 128], p[4 * ATT_CHUNK], o[4 * 128];
    for (long j = 0; j < keys * nkv; j++) {
        for (int i = 0; i < hd; i++) x[i] = (float)((j * 131 + i * 7) % 97) / 97.0f - 0.5f;
        put(x, hd, k + (size_t)j * ld);
        put(x, hd, v + (size_t)j * ld);
    }
    for (int i = 0; i < nq * hd; i++) q[i] = (float)(i % 13) / 13.0f - 0.5f;
    /* q8_0: the keys into tiles of BN_KT and q as the tile scores take it, as attention.c */
    uint8_t *tile = malloc(BN_KT * ld), qk[4 * 256];
    const void *qarg = q;
    if (kind == BN_Q8_0) {
        for (long t = 0; t < keys * nkv; t += BN_KT) {
            for (int x = 0; x < BN_KT; x++) bn_kt_put(k + (size_t)(t + x) * ld, ld, tile, x);
            memcpy(k + (size_t)t * ld, tile, BN_KT * ld);
        }
        for (int r = 0; r < nq; r++) bn_kt_query(put, q + r * hd, hd, qk + (size_t)r * bn_kt_query_bytes(hd));
        qarg = qk;
    }
    /* "scores" or "pv": that loop alone; "read": each chunk's K and V bytes read and summed, no arithmetic
     * (the stream's own speed in this pattern) */
    const char *only = argc > 4 ? argv[4] : "";
    if (*only && strcmp(only, "scores") && strcmp(only, "pv") && (strcmp(only, "read") || !HAVE_READ)) {
        fprintf(stderr, "%s: the mode is scores, pv or read (read: x86 only), not %s\n", argv[0], only);
        return 2;
    }
    uint64_t sum = 0;
    for (int i = 0; i < nq * ATT_CHUNK; i++) p[i] = 1.0f / ATT_CHUNK;
    memset(o, 0, sizeof o);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (int h = 0; h < nkv; h++) {
            const uint8_t *kh = k + (size_t)h * keys * ld, *vh = v + (size_t)h * keys * ld;
            for (long j = 0; j < keys; j += ATT_CHUNK) {
                int n = keys - j < ATT_CHUNK ? (int)(keys - j) : ATT_CHUNK;
                if (!strcmp(only, "read")) {
                    sum += read_bytes(kh + (size_t)j * ld, (size_t)n * ld) + read_bytes(vh + (size_t)j * ld, (size_t)n * ld);
                    continue;
                }
                /* as attention.c: the first rows of V requested before the scores, the next chunk's K along p.v */
                if (strcmp(only, "pv")) {
                    if (strcmp(only, "scores")) prefetch_first(vh + (size_t)j * ld, ld, n);
                    sc(qarg, nq, hd, kh + (size_t)j * ld, ld, n, 0.088f, p, ATT_CHUNK);
                }
                for (int r = 0; r < nq; r++) /* stands for the softmax */
                    for (int i = 0; i < n; i++) p[r * ATT_CHUNK + i] = 1.0f / ATT_CHUNK;
                if (strcmp(only, "scores")) {
                    /* the next chunk's keys, requested along p.v (attention.c: the next unit's, of the next
                     * kv head after a head's last chunk; here none there) */
                    bn_ahead next = {NULL, 0};
                    if (strcmp(only, "pv") && j + ATT_CHUNK < keys)
                        next = (bn_ahead){kh + (size_t)(j + ATT_CHUNK) * ld,
                                          (keys - j - ATT_CHUNK < ATT_CHUNK ? (size_t)(keys - j - ATT_CHUNK) : ATT_CHUNK) * ld};
                    pv(o, nq, hd, p, ATT_CHUNK, vh + (size_t)j * ld, ld, n, &next);
                }
            }
        }
        double t = now() - t0;
        best = t < best ? t : best;
    }
    /* the bytes and multiply-adds of what ran: one loop reads K or V alone and does half the work */
    double share = *only && strcmp(only, "read") ? 0.5 : 1.0, macs = strcmp(only, "read") ? 2.0 * share : 0.0;
    printf("%s kernels %s %s, %ld keys x %d kv heads: %.3f ms, %.2f GB/s (%.1f MB), %.1f G multiply-adds/s\n",
           argv[1], name, *only ? only : "scores + p.v", keys, nkv, best * 1e3, 2.0 * share * bytes / best / 1e9,
           2.0 * share * bytes / 1e6, macs * keys * nkv * nq * hd / best / 1e9);
    free(tile);
    return o[0] != o[0] || sum == 42; /* keeps the results live */
}
