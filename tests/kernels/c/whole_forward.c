/* The whole forward in C (bitnet.h), on every kernel path this build runs, against the scalar path: small
 * random models (head_dim 16, 18 and 32: KV rows of a half, a padded and a whole q8_0 block; hidden
 * sizes 64, 72 and 128: the heads' tails) in both weight formats, KV caches of each kind and the int8
 * and 6-bit heads, a prefill and decode steps after it. The projections' integer sums are exact on every
 * path; norms, attention and the heads' scaling sum floats in other orders, and a last-bit difference
 * can move an int8 activation by one step (a position off by ~1e-2; with the f16 cache and the int8 head
 * at H 64 the x86 paths do so at 4 of the 6 decode steps). So per position err = max |a - b| / max
 * |scalar|, and a path passes as tests/engine's assert_close_over_a_long_sequence does (the median under
 * 1e-4, none over 0.05) with one more bar for the decode steps, which the prefill's positions would
 * outvote: at least one of them under 1e-4 (an error in the decode path moves every step). The outputs
 * start as NaN, so a logit a path leaves unwritten fails. Exact.c checks
 * the kernels one by one; this checks how forward.c, attention.c and head.c put them together (on ARM,
 * under qemu in CI, the only run of the NEON forward).
 *
 *   K=src/bitlm/kernels; gcc -O2 -std=c11 -I$K tests/kernels/c/whole_forward.c $K/{bitnet,forward,attention,
 *       head,kvops,vecops,dispatch,pool,scalar,avx2,avx512vnni,avx512vbmi,amx,neon,convert}.c -lpthread -lm
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_impl.h" /* bn_kv_row_bytes */

enum { L = 2, I = 96, NH = 4, NKV = 2, V = 40, MAXLEN = 44, PREFILL = 37, STEPS = 6 };
static int H, HD; /* the shape being run: H = NH * HD */

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint32_t next(void) { /* xorshift64* */
    state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
    return (uint32_t)((state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float frand(void) { return (float)(next() % 20001) / 10000.0f - 1.0f; }

/* one projection [out, in] in format fmt, from random Hugging Face packed codes (2-bit fields 0..2) */
static uint8_t *projection(int fmt, int out, int in) {
    size_t hf_bytes = (size_t)(out + 3) / 4 * in, cols = (size_t)i2v_fmt_cols(fmt);
    uint8_t *hf = malloc(hf_bytes), *w = malloc((size_t)(out + 15) / 16 * ((in + cols - 1) / cols) * 64);
    for (size_t i = 0; i < hf_bytes; i++) {
        uint8_t b = 0;
        for (int f = 0; f < 4; f++) b |= (uint8_t)((next() % 3) << (2 * f));
        hf[i] = b;
    }
    if (i2v_from_hf_fmt(fmt, hf, out, in, w)) {
        printf("could not pack a %d x %d projection\n", out, in);
        exit(2);
    }
    free(hf);
    return w;
}

typedef struct {
    int64_t ints[BN_NI + BN_NL * L];
    double flts[1 + 7 * L];
    void *owned[64];
    int nowned;
} desc;

static void *own(desc *d, void *p) { return d->owned[d->nowned++] = p; }


/* the model's arrays (the same random values for every build of it: the seed is reset) */
static void build(desc *d, int fmt, int kv, int head, int path) {
    memset(d, 0, sizeof *d);
    state = 0x9E3779B97F4A7C15ull;
    int64_t *n = d->ints;
    n[BN_I_LAYERS] = L, n[BN_I_HIDDEN] = H, n[BN_I_INTER] = I, n[BN_I_HEADS] = NH, n[BN_I_KV_HEADS] = NKV;
    n[BN_I_HEAD_DIM] = HD, n[BN_I_VOCAB] = V, n[BN_I_MAX_LEN] = MAXLEN, n[BN_I_ACT] = 0, n[BN_I_PATH] = path;
    n[BN_I_KV_KIND] = kv, n[BN_I_EMBED_FD] = -1, n[BN_I_WFMT] = fmt, n[BN_I_EMBED_KIND] = BN_F32;
    float *cs = own(d, malloc(sizeof(float) * MAXLEN * HD)), *sn = own(d, malloc(sizeof(float) * MAXLEN * HD));
    for (int p = 0; p < MAXLEN; p++)
        for (int i = 0; i < HD; i++) {
            double f = p * pow(10000.0, -2.0 * (i % (HD / 2)) / HD);
            cs[p * HD + i] = (float)cos(f), sn[p * HD + i] = (float)sin(f);
        }
    n[BN_I_ROPE_COS] = (int64_t)(intptr_t)cs, n[BN_I_ROPE_SIN] = (int64_t)(intptr_t)sn;
    float *fn = own(d, malloc(sizeof(float) * H)), *emb = own(d, malloc(sizeof(float) * V * H));
    for (int i = 0; i < H; i++) fn[i] = 1.0f + 0.1f * frand();
    for (int i = 0; i < V * H; i++) emb[i] = frand();
    n[BN_I_FINAL_NORM] = (int64_t)(intptr_t)fn, n[BN_I_EMBED] = (int64_t)(intptr_t)emb;
    n[BN_I_HEAD_KIND] = head;
    float *hs = own(d, malloc(sizeof(float) * V));
    for (int v = 0; v < V; v++) hs[v] = 0.01f * (1.0f + 0.5f * frand());
    n[BN_I_HEAD_SCALE] = (int64_t)(intptr_t)hs;
    if (head == BN_Q8) {
        int8_t *e = own(d, malloc((size_t)V * H));
        int32_t *rs = own(d, calloc(V, sizeof(int32_t)));
        for (int v = 0; v < V; v++)
            for (int i = 0; i < H; i++) rs[v] += e[v * H + i] = (int8_t)(next() % 255) - 127;
        n[BN_I_HEAD] = (int64_t)(intptr_t)e, n[BN_I_HEAD_ROWSUM] = (int64_t)(intptr_t)rs;
    } else { /* BN_Q6: rows of ceil(H / 64) groups of 48 bytes, any bits are codes 0..63 */
        size_t bytes = (size_t)V * ((H + 63) / 64) * 48;
        uint8_t *e = own(d, malloc(bytes));
        for (size_t i = 0; i < bytes; i++) e[i] = (uint8_t)next();
        n[BN_I_HEAD] = (int64_t)(intptr_t)e;
    }
    d->flts[0] = 1e-5;
    const int shape[7][2] = {{NH * HD, H}, {NKV * HD, H}, {NKV * HD, H}, {H, NH * HD}, {I, H}, {I, H}, {H, I}};
    for (int l = 0; l < L; l++) {
        int64_t *y = n + BN_NI + BN_NL * l;
        for (int j = 0; j < 4; j++) { /* the norms' weights: attention, feed-forward, then their sub-norms */
            int len = j == BN_L_FFN_SUB_NORM ? I : j == BN_L_ATTN_SUB_NORM ? NH * HD : H;
            float *g = own(d, malloc(sizeof(float) * len));
            for (int i = 0; i < len; i++) g[i] = 1.0f + 0.1f * frand();
            y[j] = (int64_t)(intptr_t)g;
        }
        for (int j = 0; j < 7; j++) {
            y[BN_L_Q + j] = (int64_t)(intptr_t)own(d, projection(fmt, shape[j][0], shape[j][1]));
            d->flts[1 + 7 * l + j] = 0.5 + 0.25 * frand();
        }
    }
    /* the own cache: whole blocks of BN_KV_BLOCK positions (MAXLEN 44: a block, its last q8_0 tile part used) */
    n[BN_I_KV_CACHE] = (int64_t)(intptr_t)own(
        d, calloc((size_t)bn_kv_blocks(MAXLEN) * L * 2 * NKV * BN_KV_BLOCK, bn_kv_row_bytes(kv, HD)));
}

/* the logits of a prefill of PREFILL tokens (all positions) and STEPS decode steps: [PREFILL + STEPS, V] */
static int run(int fmt, int kv, int head, int path, float *out) {
    desc d;
    build(&d, fmt, kv, head, path);
    bn_model *m = bn_model_new(d.ints, BN_NI + BN_NL * L, d.flts, 1 + 7 * L);
    int rc = m ? 0 : -9;
    int32_t tok[PREFILL + STEPS];
    for (int t = 0; t < PREFILL + STEPS; t++) tok[t] = (int32_t)(next() % V);
    if (!rc) rc = bn_forward(m, tok, PREFILL, 0, out, PREFILL);
    for (int s = 0; s < STEPS && !rc; s++)
        rc = bn_forward(m, tok + PREFILL + s, 1, PREFILL + s, out + (size_t)(PREFILL + s) * V, 1);
    if (m) bn_model_free(m);
    for (int i = 0; i < d.nowned; i++) free(d.owned[i]);
    return rc;
}

static int cmp_float(const void *a, const void *b) { /* NaN last */
    float x = *(const float *)a, y = *(const float *)b;
    return x != x ? (y != y ? 0 : 1) : y != y ? -1 : (x > y) - (x < y);
}

int main(void) {
    static const int shapes[3][2] = {{64, 16}, {72, 18}, {128, 32}}; /* H, head_dim */
    const int T = PREFILL + STEPS, kinds[3] = {BN_F32, BN_F16, BN_Q8_0}, heads[2] = {BN_Q8, BN_Q6};
    float *ref = malloc(sizeof(float) * T * V), *got = malloc(sizeof(float) * T * V), err[PREFILL + STEPS];
    int bad = 0;
    for (int sh = 0; sh < 3; sh++)
        for (int fmt = 0; fmt < I2V_NFMTS; fmt++)
            for (int k = 0; k < 3; k++)
                for (int h = 0; h < 2; h++) {
                    H = shapes[sh][0], HD = shapes[sh][1];
                    for (int i = 0; i < T * V; i++) ref[i] = NAN;
                    if (run(fmt, kinds[k], heads[h], I2V_PATH_SCALAR, ref)) {
                        printf("FAILED: the scalar forward (H %d fmt %d kv %d head %d)\n", H, fmt, kinds[k], heads[h]);
                        return 1;
                    }
                    for (int path = 0; path < I2V_NPATHS; path++) {
                        if (path == I2V_PATH_SCALAR || !i2v_path_supported(path)) continue;
                        for (int i = 0; i < T * V; i++) got[i] = NAN;
                        int rc = run(fmt, kinds[k], heads[h], path, got);
                        float worst = 0.0f, best_step = INFINITY;
                        for (int t = 0; t < T; t++) {
                            float num = 0.0f, den = 0.0f;
                            for (int v = 0; v < V; v++) {
                                float e = fabsf(got[t * V + v] - ref[t * V + v]);
                                num = e > num || e != e ? e : num; /* NaN: unwritten */
                                den = fmaxf(den, fabsf(ref[t * V + v]));
                            }
                            err[t] = num / den;
                            worst = err[t] > worst || err[t] != err[t] ? err[t] : worst;
                            if (t >= PREFILL) best_step = fminf(best_step, err[t]);
                        }
                        qsort(err, T, sizeof(float), cmp_float);
                        int ok = !rc && err[T / 2] < 1e-4f && worst < 0.05f && best_step < 1e-4f;
                        printf("%s path %s H %d fmt %d kv %d head %d: median %.2e, max %.2e, best step %.2e\n",
                               ok ? "ok" : "MISMATCH", i2v_path_name(path), H, fmt, kinds[k], heads[h], err[T / 2],
                               worst, best_step);
                        bad |= !ok;
                    }
                }
    free(ref), free(got);
    return bad;
}
