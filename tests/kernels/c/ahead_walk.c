/* What kvops.c's p.v kernels request of bitnet_impl.h's `ahead` stream: kvops.c is included here with
 * __builtin_prefetch replaced by a recorder, then every kernel path this build runs takes streams of
 * every alignment and length, in calls of every key count, head_dim and q-row count. Each call must
 * request exactly the 64-byte lines that hold the stream, each once, and no other line of its buffer
 * (the scalar reference: none); what a kernel requests of its own values lies in another buffer.
 * Prints "ahead walk: N calls exact" or a MISMATCH line a wrong call (exit status 1). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uintptr_t seen[1 << 16];
static size_t nseen;

void record_prefetch(const void *a); /* external: the system headers' inline functions call it too */
void record_prefetch(const void *a) {
    if (nseen < sizeof seen / sizeof *seen) seen[nseen++] = (uintptr_t)a;
}

#define __builtin_prefetch(a, ...) record_prefetch((const void *)(a))
#include "kvops.c"
#undef __builtin_prefetch

int main(void) {
    enum { SPAN = 40000, KEYS = 256, MAXHD = 128, MAXQ = 8 };
    const int kinds[] = {BN_F32, BN_F16, BN_Q8_0}, hds[] = {8, 16, 48, 64, 128}, ns[] = {1, 3, 16, 17, 100, KEYS};
    const int nqs[] = {1, 4, 8}, offs[] = {0, 1, 37};
    const size_t lens[] = {0, 1, 63, 64, 65, 1000, 34816};
    uint8_t *buf = aligned_alloc(64, SPAN), *vals = calloc((size_t)KEYS * 4 * MAXHD, 1);
    float *o = calloc((size_t)MAXQ * MAXHD, sizeof(float)), *p = calloc((size_t)MAXQ * KEYS, sizeof(float));
    if (!buf || !vals || !o || !p) return 2;
    long calls = 0;
    int bad = 0;
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        for (size_t ki = 0; ki < sizeof kinds / sizeof *kinds; ki++)
            for (size_t hi = 0; hi < sizeof hds / sizeof *hds; hi++) {
                int kind = kinds[ki], hd = hds[hi];
                scores_fn sc;
                pv_fn pv;
                kvput_fn put;
                const char *name = bn_pick_kv(path, kind, hd, &sc, &pv, &put);
                size_t ldv = bn_kv_row_bytes(kind, hd);
                for (size_t qi = 0; qi < sizeof nqs / sizeof *nqs; qi++)
                    for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++)
                        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++)
                            for (size_t oi = 0; oi < sizeof offs / sizeof *offs; oi++) {
                                const uint8_t *s = buf + 64 + offs[oi];
                                bn_ahead a = {s, lens[li]};
                                nseen = 0;
                                pv(o, nqs[qi], hd, p, KEYS, vals, ldv, ns[ni], &a);
                                calls++;
                                /* the lines expected, in order: those that hold s .. s + len - 1 */
                                uintptr_t first = (uintptr_t)s & ~(uintptr_t)63;
                                size_t want = !strcmp(name, "scalar") || !lens[li]
                                                  ? 0
                                                  : ((uintptr_t)s + lens[li] - first + 63) / 64;
                                size_t got = 0;
                                int wrong = 0;
                                for (size_t i = 0; i < nseen; i++) {
                                    if (seen[i] < (uintptr_t)buf || seen[i] >= (uintptr_t)buf + SPAN) continue;
                                    wrong |= got >= want || seen[i] != first + 64 * got;
                                    got++;
                                }
                                if (wrong || got != want) {
                                    printf("MISMATCH ahead walk: path %s kind %d hd %d nq %d n %d len %zu offset %d: "
                                           "%zu lines requested, %zu wanted%s\n",
                                           name, kind, hd, nqs[qi], ns[ni], lens[li], offs[oi], got, want,
                                           wrong ? ", not the stream's lines in order" : "");
                                    bad = 1;
                                }
                            }
            }
    }
    printf("ahead walk: %ld calls %s\n", calls, bad ? "with mismatches" : "exact");
    free(buf), free(vals), free(o), free(p);
    return bad;
}
