/* Exactness harness for the kernel library in C alone (no Python): every path this build offers
 * against a naive reference (ternary products, the several-matrix and dequantizing drivers, the 6-bit
 * head) or against the scalar path (the activation quantizer: int8 codes, scales and sums bit-equal; the
 * attention kernels over f32, f16 and q8_0 KV rows: within float rounding, and bit-equal across cuts),
 * on random ternary weights, ragged shapes and extreme activations.
 * Built and run by tests/kernels/test_c_harness.py: natively; with -DI2V_SIMDE, where the AVX-512
 * kernels run on SIMDe's portable intrinsics on any x86-64 CPU (x86_avx512.h); and for AArch64 under
 * qemu-user (the NEON path). Prints the CPU features, then one line per path; exit 1 on a mismatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_impl.h" /* i2v.h, and the KV kernels of kvops.c (bn_pick_kv) */

#ifdef I2V_SIMDE
#define EMULATED(path) i2v_path_has_avx512vnni(path)  /* the AVX-512 kernels on SIMDe (x86_avx512.h) */
#else
#define EMULATED(path) 0
#endif

static int bad[I2V_NPATHS];  /* a mismatch seen on path p */

static unsigned long long rng = 88172645463325252ull;
static unsigned next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 11);
}

/* the layout as documented (formats/i2v.py): byte 4r+j of block (rb, kb), bits 2s = column 16kb+4s+j */
static void pack(const int8_t *w, int N, int K, uint8_t *out) {
    int Nb = (N + 15) / 16, Kb = (K + 15) / 16;
    memset(out, 0, (size_t)Nb * Kb * 64);
    for (int n = 0; n < Nb * 16; n++)
        for (int k = 0; k < Kb * 16; k++) {
            int c = (n < N && k < K) ? w[(size_t)n * K + k] + 1 : 1;
            int rb = n / 16, r = n % 16, kb = k / 16, s = (k % 16) / 4, j = k % 4;
            out[((size_t)rb * Kb + kb) * 64 + 4 * r + j] |= (uint8_t)(c << (2 * s));
        }
}

/* T5 as documented (formats/t5.py): byte 4r+i of block (rb, kb) = ceil(256 v / 243), v the base-3 number
 * of the codes at columns 20kb+4j+i, j = 0..4 (j = 0 the most significant digit) */
static void pack_t5(const int8_t *w, int N, int K, uint8_t *out) {
    int Nb = (N + 15) / 16, Kb = (K + 19) / 20;
    for (int n = 0; n < Nb * 16; n++)
        for (int kb = 0; kb < Kb; kb++)
            for (int i = 0; i < 4; i++) {
                int v = 0;
                for (int j = 0; j < 5; j++) {
                    int k = 20 * kb + 4 * j + i;
                    v = 3 * v + ((n < N && k < K) ? w[(size_t)n * K + k] + 1 : 1);
                }
                out[((size_t)(n / 16) * Kb + kb) * 64 + 4 * (n % 16) + i] = (uint8_t)((256 * v + 242) / 243);
            }
}

static const char *const FMT_NAMES[I2V_NFMTS] = {"i2v", "t5"};

static size_t packed_bytes(int fmt, int N, int K) {
    return (size_t)((N + 15) / 16) * ((K + i2v_fmt_cols(fmt) - 1) / i2v_fmt_cols(fmt)) * 64;
}

static void pack_fmt(int fmt, const int8_t *w, int N, int K, uint8_t *out) {
    if (fmt == I2V_FMT_T5) pack_t5(w, N, K, out);
    else pack(w, N, K, out);
}

static void check_fmt(int fmt, int M, int N, int K, int extreme);
static void check(int M, int N, int K, int extreme) {
    for (int fmt = 0; fmt < I2V_NFMTS; fmt++) check_fmt(fmt, M, N, K, extreme);
}

static void check_fmt(int fmt, int M, int N, int K, int extreme) {
    int8_t *w = malloc((size_t)N * K), *x = malloc((size_t)M * K);
    uint8_t *p = malloc(packed_bytes(fmt, N, K));
    int32_t *ref = malloc((size_t)M * N * 4), *y = malloc((size_t)M * N * 4);
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = (int8_t)(next() % 3) - 1;
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = extreme ? (extreme > 0 ? 127 : -128) : (int8_t)(next() & 255);
    pack_fmt(fmt, w, N, K, p);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            int32_t s = 0;
            for (int k = 0; k < K; k++) s += x[(size_t)m * K + k] * w[(size_t)n * K + k];
            ref[(size_t)m * N + n] = s;
        }
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        memset(y, 0x7f, (size_t)M * N * 4);
        if (i2v_gemm_fmt(fmt, x, (size_t)K, NULL, M, K, p, N, y, (size_t)N, path) != 0 ||
            memcmp(y, ref, (size_t)M * N * 4) != 0) {
            printf("MISMATCH %s path %s M %d N %d K %d extreme %d\n", FMT_NAMES[fmt], i2v_path_name(path), M, N, K,
                   extreme);
            bad[path] = 1;
        }
    }
    free(w), free(x), free(p), free(ref), free(y);
}

/* i2v_gemm_multi and i2v_gemm_multi_f32: three matrices of one input width K (q, k, v) in one pool run,
 * outputs with row strides past N; the float form against sum * (wscale / s[m]) in float32, the
 * order of operations i2v.h gives, so bit-equal */
static void check_multi(int fmt, int M, int K, const int *N) {
    enum { NMAT = 3 };
    int8_t *x = malloc((size_t)M * K);
    float s[128];
    const float wscale[NMAT] = {0.75f, 1.3f, 0.0123f};
    uint8_t *p[NMAT];
    int32_t *ref[NMAT], *y[NMAT];
    float *yf[NMAT];
    size_t ldy[NMAT];
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = (int8_t)(next() & 255);
    for (int m = 0; m < M; m++) s[m] = 127.0f / (float)(1 + next() % 1000) * 0.37f;
    for (int i = 0; i < NMAT; i++) {
        int8_t *w = malloc((size_t)N[i] * K);
        for (size_t j = 0; j < (size_t)N[i] * K; j++) w[j] = (int8_t)(next() % 3) - 1;
        p[i] = malloc(packed_bytes(fmt, N[i], K));
        pack_fmt(fmt, w, N[i], K, p[i]);
        ldy[i] = (size_t)N[i] + 3;
        ref[i] = malloc((size_t)M * ldy[i] * 4);
        y[i] = malloc((size_t)M * ldy[i] * 4);
        yf[i] = malloc((size_t)M * ldy[i] * 4);
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N[i]; n++) {
                int32_t acc = 0;
                for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * w[(size_t)n * K + k];
                ref[i][(size_t)m * ldy[i] + n] = acc;
            }
        free(w);
    }
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        int ok = i2v_gemm_multi_fmt(fmt, x, (size_t)K, NULL, M, K, NMAT, (const uint8_t *const *)p, N, y, ldy,
                                    path) == 0 &&
                 i2v_gemm_multi_f32_fmt(fmt, x, (size_t)K, NULL, s, M, K, NMAT, (const uint8_t *const *)p, N, wscale,
                                        yf, ldy, path) == 0;
        for (int i = 0; ok && i < NMAT; i++)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N[i]; n++) {
                    size_t at = (size_t)m * ldy[i] + n;
                    float want = (float)ref[i][at] * (wscale[i] / s[m]);
                    ok &= y[i][at] == ref[i][at] && memcmp(&yf[i][at], &want, 4) == 0;
                }
        if (!ok) {
            printf("MISMATCH %s gemm_multi path %s M %d K %d N %d %d %d\n", FMT_NAMES[fmt], i2v_path_name(path), M, K,
                   N[0], N[1], N[2]);
            bad[path] = 1;
        }
    }
    for (int i = 0; i < NMAT; i++) free(p[i]), free(ref[i]), free(y[i]), free(yf[i]);
    free(x);
}

/* The activation quantizer of each path against the scalar one, which tests/kernels/test_gemm.py holds
 * to torch's: int8 codes (and the zero padding to ldq), scales and row sums bit-equal. Row kinds:
 * random at several magnitudes, all zero, exact halves (max 127 gives s = 1), one huge outlier. */
static void check_quant(int M, int K) {
    size_t ldq = (size_t)K + 5;
    float *x = malloc((size_t)M * K * 4), s0[8], s[8];
    int8_t *q0 = malloc((size_t)M * ldq), *q = malloc((size_t)M * ldq);
    int32_t sum0[8], sum[8];
    static const float mag[] = {1e-9f, 1.0f, 3.7f, 1e4f};
    for (int m = 0; m < M; m++) {
        float *xm = x + (size_t)m * K;
        int kind = m % 7;
        for (int k = 0; k < K; k++) {
            float r = (float)((int)(next() % 2000001) - 1000000) / 1e6f;
            float half = (float)((int)(next() % 255) - 127) * 0.5f;
            xm[k] = kind < 4 ? r * mag[kind] : kind == 4 ? 0.0f : kind == 5 ? half : r;
        }
        if (kind == 5) xm[0] = 127.0f;
        if (kind == 6) xm[K / 2] = 3e5f;
    }
    i2v_quantize(x, (size_t)K, M, K, q0, ldq, s0, sum0, I2V_PATH_SCALAR);
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        memset(q, 0x55, (size_t)M * ldq);
        if (i2v_quantize(x, (size_t)K, M, K, q, ldq, s, sum, path) != 0 || memcmp(q, q0, (size_t)M * ldq) != 0 ||
            memcmp(s, s0, (size_t)M * 4) != 0 || memcmp(sum, sum0, (size_t)M * 4) != 0) {
            printf("MISMATCH quantize path %s M %d K %d\n", i2v_path_name(path), M, K);
            bad[path] = 1;
        }
    }
    free(x), free(q0), free(q);
}

/* Q6 rows as documented (formats/q6.py): column 64g + 8L + j at bits 6j of the little-endian 6-byte
 * piece L of group g, code q + 32; padding columns code 32 */
static void check_q6(int M, int V, int H) {
    int ng = (H + 63) / 64, hp = 64 * ng;
    int8_t *q = malloc((size_t)V * H), *x = calloc((size_t)M, hp);
    uint8_t *p = calloc((size_t)V, (size_t)ng * 48);
    int32_t *ref = malloc((size_t)M * V * 4), *y = malloc((size_t)M * V * 4);
    for (size_t i = 0; i < (size_t)V * H; i++) q[i] = (int8_t)(next() % 63) - 31;
    for (int m = 0; m < M; m++)
        for (int h = 0; h < H; h++) x[(size_t)m * hp + h] = (int8_t)(next() & 255);
    for (int v = 0; v < V; v++)
        for (int c = 0; c < hp; c++) {
            uint64_t code = (uint64_t)((c < H ? q[(size_t)v * H + c] : 0) + 32);
            int g = c / 64, L = (c % 64) / 8, j = c % 8;
            size_t bit = (size_t)v * ng * 48 * 8 + ((size_t)g * 48 + 6 * L) * 8 + 6 * j;
            for (int b = 0; b < 6; b++)
                if (code >> b & 1) p[(bit + b) / 8] |= (uint8_t)(1u << ((bit + b) % 8));
        }
    for (int m = 0; m < M; m++)
        for (int v = 0; v < V; v++) {
            int32_t s = 0;
            for (int h = 0; h < H; h++) s += x[(size_t)m * hp + h] * q[(size_t)v * H + h];
            ref[(size_t)m * V + v] = s;
        }
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        if (i2v_q6_gemv(p, V, H, x, (size_t)hp, NULL, M, y, (size_t)V, path) != 0 ||
            memcmp(y, ref, (size_t)M * V * 4) != 0) {
            printf("MISMATCH q6 path %s (kernel %s) M %d V %d H %d\n", i2v_path_name(path), i2v_q6_kernel_name(path),
                   M, V, H);
            bad[path] = 1;
        }
    }
    free(q), free(x), free(p), free(ref), free(y);
}

/* a kernel called from inside a pool task must not deadlock on the pool (runs inline) */
typedef struct {
    int8_t *x;
    uint8_t *p;
    int32_t *y;
    int bad;
} nested_ctx;

static void nested_part(void *ctx, int part, int nparts) {
    nested_ctx *c = (nested_ctx *)ctx;
    (void)nparts;
    int32_t y[64];
    i2v_gemm(c->x, 64, NULL, 1, 64, c->p, 64, y, 64, -1);
    if (memcmp(y, c->y, sizeof y) != 0) c->bad = 1;
    (void)part;
}

static int check_nested(void) {
    int8_t x[64], w[64 * 64];
    uint8_t p[4 * 4 * 64];
    int32_t y[64];
    for (int i = 0; i < 64; i++) x[i] = (int8_t)(next() & 255);
    for (int i = 0; i < 64 * 64; i++) w[i] = (int8_t)(next() % 3) - 1;
    pack(w, 64, 64, p);
    i2v_gemm(x, 64, NULL, 1, 64, p, 64, y, 64, -1);
    nested_ctx c = {x, p, y, 0};
    i2v_pool_run(nested_part, &c, 8);
    if (c.bad) printf("MISMATCH nested call\n");
    return c.bad;
}

#if defined(__aarch64__)
/* the int8 head's NEON rows (neon.c) against plain int32 sums: every H tail, 1 to 4 rows */
static void check_q8_rows(int H) {
    int8_t *x = malloc((size_t)H), *E = malloc((size_t)4 * H);
    for (int i = 0; i < H; i++) x[i] = (int8_t)(next() % 255) - 127;
    for (int i = 0; i < 4 * H; i++) E[i] = (int8_t)(next() % 255) - 127;
    const int8_t *e[4] = {E + 3 * (size_t)H, E, E + 2 * (size_t)H, E + (size_t)H}; /* rows in any order */
    for (int nr = 1; nr <= 4; nr++) {
        int32_t got[4];
        i2v_q8_rows_neon(x, e, nr, H, got);
        for (int r = 0; r < nr; r++) {
            int32_t want = 0;
            for (int i = 0; i < H; i++) want += x[i] * e[r][i];
            if (got[r] != want) {
                printf("MISMATCH q8 head rows (neon) H %d nr %d row %d: %d != %d\n", H, nr, r, got[r], want);
                bad[I2V_PATH_NEON] = 1;
            }
        }
    }
    free(x), free(E);
}
#endif

/* ---- attention over the KV cache (kvops.c) ---- */
static float frand(void) { return (float)(next() % 20001) / 10000.0f - 1.0f; } /* [-1, 1] */

/* n rows of hd values, each row ld bytes apart, in the KV element kind (the scalar store: f16 rounded to
 * nearest even, q8_0 as formats/q8_0.py) */
static uint8_t *kv_rows(int kind, int hd, int n, size_t ld) {
    scores_fn sc;
    pv_fn pv;
    kvput_fn put;
    bn_pick_kv(I2V_PATH_SCALAR, kind, hd, &sc, &pv, &put);
    uint8_t *rows = calloc((size_t)n, ld);
    float *x = malloc(sizeof(float) * (size_t)hd);
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < hd; i++) x[i] = frand() * (1 + j % 3); /* rows of different sizes */
        put(x, hd, rows + (size_t)j * ld);
    }
    free(x);
    return rows;
}

/* n KV rows read back as float (the scalar p.v with p = 1 over one row at a time) */
static float *kv_floats(int kind, int hd, const uint8_t *rows, size_t ld, int n) {
    scores_fn sc;
    pv_fn pv;
    kvput_fn put;
    bn_pick_kv(I2V_PATH_SCALAR, kind, hd, &sc, &pv, &put);
    float *out = calloc((size_t)n * hd, sizeof(float)), one = 1.0f;
    for (int j = 0; j < n; j++) pv(out + (size_t)j * hd, 1, hd, &one, 1, rows + (size_t)j * ld, ld, 1, NULL);
    return out;
}

/* each path's scores and p.v against the scalar reference, within float rounding (their sums run in
 * other orders): |a - b| <= (terms + 2) * 2^-23 * (1 + the sum of the terms' magnitudes), orders of
 * magnitude below one wrong or missing term; bit-equal when the keys come in two calls, cut .. n first and
 * then 0 .. cut, as in one (attention.c follows a paged cache's blocks so); nothing written past a call's
 * keys or o's rows; the f16 store bit-equal to the scalar cast */
/* the softmax numerators (vecops.c expsum) of n scores below mx by up to 110, on every path run natively:
 * each element within 2^-22 of exp of its float difference (0 where that is below -87.34, below the
 * smallest normal float where the scalar path's expf goes subnormal), the sum within n 2^-22 of theirs, and
 * the AVX-512 elements the AVX2 loop's bits where that runs its polynomial */
static void check_expsum(int n) {
    float *s = malloc(sizeof(float) * (size_t)n), *got = malloc(sizeof(float) * (size_t)n);
    float *avx2 = malloc(sizeof(float) * (size_t)n), mx = 3.25f;
    for (int j = 0; j < n; j++) s[j] = mx - 110.0f * (float)(next() % 100000) / 100000.0f;
    s[n / 2] = mx;
    int have_avx2 = 0;
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path) || EMULATED(path)) continue;
        memcpy(got, s, sizeof(float) * (size_t)n);
        float sum = bn_pick_expsum(path)(got, n, mx);
        double want = 0;
        int wrong = 0;
        for (int j = 0; j < n; j++) {
            float d = s[j] - mx;
            double e = exp((double)d);
            want += e;
            wrong |= d >= -87.33654f ? fabs(got[j] - e) > 0x1p-22 * e : !(got[j] >= 0.0f && got[j] < 0x1p-126f);
        }
        wrong |= fabs(sum - want) > n * 0x1p-22 * want;
        if (path == I2V_PATH_AVX2) memcpy(avx2, got, sizeof(float) * (size_t)n), have_avx2 = 1;
        if (i2v_path_has_avx512vnni(path) && have_avx2) /* the AVX2 loop's vector part (its tail is expf) */
            wrong |= memcmp(got, avx2, sizeof(float) * (size_t)(n / 8 * 8)) != 0;
        if (wrong) printf("MISMATCH expsum path %s n %d\n", i2v_path_name(path), n), bad[path] = 1;
    }
    free(s), free(got), free(avx2);
}

static void check_kv(int kind, int nq, int hd, int n, int cut) {
    const size_t ld = bn_kv_row_bytes(kind, hd) + 6, ldo = (size_t)n + 3; /* rows not packed: ld is honoured */
    const size_t nqh = (size_t)nq * hd, sz = (size_t)nq * ldo, fb = sizeof(float);
    uint8_t *K = kv_rows(kind, hd, n, ld), *V = kv_rows(kind, hd, n, ld);
    float *kf = kv_floats(kind, hd, K, ld, n), *vf = kv_floats(kind, hd, V, ld, n);
    /* q8_0 keys: in tiles of BN_KT (rows packed, ldk = a row's bytes; a call starts at a tile: cut too), the
     * last tile's unused lanes junk; q as the tile scores take it (bn_kt_query), its values dequantized */
    size_t ldk = ld;
    uint8_t *Karg = K, *qk = NULL;
    if (kind == BN_Q8_0) {
        ldk = bn_kv_row_bytes(kind, hd);
        Karg = malloc((size_t)(n + BN_KT - 1) / BN_KT * BN_KT * ldk);
        for (size_t i = 0; i < (size_t)(n + BN_KT - 1) / BN_KT * BN_KT * ldk; i++) Karg[i] = (uint8_t)next();
        for (int j = 0; j < n; j++) bn_kt_put(K + (size_t)j * ld, ldk, Karg + (size_t)j / BN_KT * BN_KT * ldk, j % BN_KT);
        cut = cut / BN_KT * BN_KT;
    }
    const int guard = 16; /* floats past o's rows, which p.v must leave alone */
    float *q = malloc(fb * nqh), *o0 = malloc(fb * nqh), *oref = malloc(fb * nqh), *o1 = malloc(fb * (nqh + guard));
    float *o2 = malloc(fb * (nqh + guard)), *p = malloc(fb * sz), *ref = malloc(fb * sz), *got = malloc(fb * sz);
    float *two = malloc(fb * sz);
    const uint32_t junk = 0x7FC0BEEFu; /* a NaN no kernel computes: what a call must not overwrite */
    for (size_t i = 0; i < nqh; i++) q[i] = frand(), o0[i] = frand();
    for (size_t i = 0; i < sz; i++) p[i] = 0.5f * (frand() + 1.0f);
    scores_fn sc;
    pv_fn pv;
    kvput_fn put, ref_put;
    bn_pick_kv(I2V_PATH_SCALAR, kind, hd, &sc, &pv, &ref_put);
    const void *qarg = q;
    float *qf = q;
    if (kind == BN_Q8_0) {
        size_t qb = bn_kt_query_bytes(hd);
        qk = malloc((size_t)nq * qb);
        for (int r = 0; r < nq; r++) bn_kt_query(ref_put, q + (size_t)r * hd, hd, qk + (size_t)r * qb);
        qf = kv_floats(BN_Q8_0, hd, qk, qb, nq);
        for (int r = 0; r < nq; r++) /* the block sums the tile kernels take */
            for (int b = 0; b < (hd + 31) / 32; b++) {
                int32_t sum = 0, got;
                for (int i = 0; i < 32; i++) sum += (int8_t)qk[(size_t)r * qb + 34 * (size_t)b + 2 + i];
                memcpy(&got, qk + (size_t)r * qb + 34 * (size_t)((hd + 31) / 32) + 4 * (size_t)b, 4);
                if (got != sum) printf("MISMATCH bn_kt_query's block sum: hd %d row %d block %d\n", hd, r, b), bad[I2V_PATH_SCALAR] = 1;
            }
        qarg = qk;
    }
    sc(qarg, nq, hd, Karg, ldk, n, 0.125f, ref, ldo);
    if (kind == BN_Q8_0) /* the scalar tile scores against a double dot of the values they take */
        for (int r = 0; r < nq; r++)
            for (int j = 0; j < n; j++) {
                double dot = 0, terms = 0;
                for (int i = 0; i < hd; i++) {
                    dot += (double)qf[r * hd + i] * kf[(size_t)j * hd + i];
                    terms += fabs((double)qf[r * hd + i] * kf[(size_t)j * hd + i]);
                }
                if (fabs(ref[(size_t)r * ldo + j] - 0.125 * dot) > (hd + 2) * 0x1p-23 * (1 + 0.125 * terms)) {
                    printf("MISMATCH q8_0 tile scores (scalar) against a double dot: nq %d hd %d n %d\n", nq, hd, n);
                    bad[I2V_PATH_SCALAR] = 1;
                }
            }
    memcpy(oref, o0, fb * nqh);
    pv(oref, nq, hd, p, ldo, V, ld, n, NULL);
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path) || EMULATED(path)) continue; /* kvops.c is built natively only */
        const char *name = bn_pick_kv(path, kind, hd, &sc, &pv, &put);
        int wrong = 0;
        for (size_t i = 0; i < sz; i++) memcpy(&got[i], &junk, fb), memcpy(&two[i], &junk, fb);
        sc(qarg, nq, hd, Karg, ldk, n, 0.125f, got, ldo);
        sc(qarg, nq, hd, Karg + (size_t)cut * ldk, ldk, n - cut, 0.125f, two + cut, ldo);
        sc(qarg, nq, hd, Karg, ldk, cut, 0.125f, two, ldo);
        memcpy(o1, o0, fb * nqh);
        memcpy(o2, o0, fb * nqh);
        for (int i = 0; i < guard; i++) memcpy(&o1[nqh + i], &junk, fb), memcpy(&o2[nqh + i], &junk, fb);
        /* o1 requests the keys along (bitnet_impl.h's ahead, from an odd byte: lines counted from the one
         * it falls in), o2 nothing: the same bits */
        const bn_ahead keys_along = {Karg + 1, (size_t)n * ldk - 1};
        pv(o1, nq, hd, p, ldo, V, ld, n, &keys_along);
        pv(o2, nq, hd, p, ldo, V, ld, cut, NULL);
        pv(o2, nq, hd, p + cut, ldo, V + (size_t)cut * ld, ld, n - cut, NULL);
        for (int r = 0; r < nq; r++) {
            for (int j = 0; j < n; j++) {
                double terms = 0;
                for (int i = 0; i < hd; i++) terms += fabs((double)qf[r * hd + i] * kf[(size_t)j * hd + i]) * 0.125;
                size_t at = (size_t)r * ldo + j;
                wrong |= fabs((double)got[at] - ref[at]) > (hd + 2) * 0x1p-23 * (1 + terms) ||
                         memcmp(&got[at], &two[at], fb) || (kind == BN_Q8_0 && memcmp(&got[at], &ref[at], fb));
            }
            for (size_t j = (size_t)n; j < ldo; j++) /* the padding of each row of scores */
                wrong |= memcmp(&got[(size_t)r * ldo + j], &junk, fb) || memcmp(&two[(size_t)r * ldo + j], &junk, fb);
            for (int i = 0; i < hd; i++) {
                double terms = fabs(o0[r * hd + i]);
                for (int j = 0; j < n; j++) terms += fabs((double)p[(size_t)r * ldo + j] * vf[(size_t)j * hd + i]);
                size_t at = (size_t)r * hd + i;
                wrong |= fabs((double)o1[at] - oref[at]) > (n + 2) * 0x1p-23 * (1 + terms) ||
                         memcmp(&o1[at], &o2[at], fb);
            }
        }
        for (int i = 0; i < guard; i++) wrong |= memcmp(&o1[nqh + i], &junk, fb) || memcmp(&o2[nqh + i], &junk, fb);
        if (kind == BN_F16) { /* values of every size, subnormal to past f16's largest (to infinity); an odd
                                 count, so that the vector stores' tail runs too */
            uint16_t a[64], b[64];
            float x[64];
            int m = hd < 64 ? hd - 1 : 63;
            for (int i = 0; i < m; i++) x[i] = frand() * ldexpf(1.0f, (int)(next() % 42) - 24);
            put(x, m, a);
            ref_put(x, m, b);
            wrong |= memcmp(a, b, sizeof(uint16_t) * (size_t)m) != 0;
        }
        if (wrong) {
            printf("MISMATCH kv kind %d path %s (kernels %s) nq %d hd %d n %d cut %d\n", kind, i2v_path_name(path),
                   name, nq, hd, n, cut);
            bad[path] = 1;
        }
    }
    free(K), free(V), free(kf), free(vf), free(q), free(o0), free(oref), free(o1), free(o2), free(p), free(ref);
    free(got), free(two);
    if (kind == BN_Q8_0) free(Karg), free(qk), free(qf);
}

int main(void) {
    static const int shapes[][3] = {{1, 1, 1}, {1, 17, 15}, {1, 64, 2560}, {1, 129, 48}, {3, 33, 100},
                                    {8, 16, 16}, {17, 65, 129}, {20, 100, 333}, {33, 48, 64}, {64, 31, 200},
                                    {1, 20, 12000}, {3, 17, 12000},   /* past T5_FLUSH_KB blocks, */
                                    {2, 128, 12000}, {3, 128, 12000}}; /* also in 4-row-block groups */
    int n = (int)(sizeof shapes / sizeof shapes[0]);
    printf("features: %s\n", i2v_cpu_features());
    for (int t = 1; t <= 2; t++) {
        i2v_pool_set_threads(t);
        for (int i = 0; i < n; i++)
            for (int e = -1; e <= 1; e++) check(shapes[i][0], shapes[i][1], shapes[i][2], e);
        for (int fmt = 0; fmt < I2V_NFMTS; fmt++) {
            check_multi(fmt, 1, 100, (const int[]){64, 16, 35});
            check_multi(fmt, 5, 2560, (const int[]){80, 17, 200});  /* several parts, each dequantizing its rows */
            check_multi(fmt, 21, 129, (const int[]){48, 33, 1});    /* AMX tiles */
            check_multi(fmt, 70, 45, (const int[]){32, 20, 5});     /* T5: a second panel of 64 rows */
        }
    }
    for (int m = 1; m <= 20; m++) check(m, 6 * 16 + 9, 30 * 16 + 7, 0);  /* every decode-step M, 7 row blocks */
    for (int i = 0; i < 40; i++) check(1 + next() % 24, 1 + next() % 300, 1 + next() % 700, 0);
    static const int qshapes[][2] = {{1, 1}, {1, 15}, {7, 16}, {7, 17}, {3, 100}, {7, 2563}};
    for (int i = 0; i < (int)(sizeof qshapes / sizeof qshapes[0]); i++) check_quant(qshapes[i][0], qshapes[i][1]);
    int nested_bad = check_nested();
    check_q6(1, 1, 1), check_q6(1, 37, 100), check_q6(2, 301, 640), check_q6(3, 8, 2560);
    for (int m = 1; m <= 20; m++) check_q6(m, 7, 9 * 64 + 17);  /* every decode-step M */
#if defined(__aarch64__)
    if (i2v_path_supported(I2V_PATH_NEON)) {
        for (int H = 1; H <= 40; H++) check_q8_rows(H);
        check_q8_rows(2560), check_q8_rows(2567);
    }
#endif
    static const int kvshapes[][4] = {{4, 128, 37, 13}, {5, 64, 4, 1}, {4, 48, 1, 0}, {3, 40, 20, 16},
                                      {2, 20, 9, 4}, {8, 128, 300, 256}, {4, 128, 48, 32}, {6, 96, 47, 40},
                                      {1, 1024, 17, 16}, {2, 56, 9, 4}, {1, 8, 3, 1}};
    /* nq, hd, n, cut (q8_0 keys: cut / 16 * 16); hd 56: an 8-column slice at c % 32 == 16 (AVX2 p.v reuses
     * the block's weights there) */
    for (int kind = 0; kind <= BN_Q8_0; kind++) {
        if (kind != BN_F32 && kind != BN_F16 && kind != BN_Q8_0) continue;
        for (int i = 0; i < (int)(sizeof kvshapes / sizeof kvshapes[0]); i++)
            check_kv(kind, kvshapes[i][0], kvshapes[i][1], kvshapes[i][2], kvshapes[i][3]);
    }
    for (int n = 1; n <= 40; n++) check_expsum(n);
    check_expsum(255), check_expsum(256), check_expsum(1000);
    int any = nested_bad;
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        any |= bad[path];
        scores_fn sc;
        pv_fn pv;
        kvput_fn put;
        printf("path %s: %s (gemm, gemm_multi, gemm_multi_f32 on i2v and t5, quantize; q6 head kernel %s; "
               "attention kernels and softmax %s)%s\n", i2v_path_name(path), bad[path] ? "FAILED" : "exact",
               i2v_q6_kernel_name(path), EMULATED(path) ? "not run" : bn_pick_kv(path, BN_F16, 128, &sc, &pv, &put),
               EMULATED(path) ? " [SIMDe emulation]" : "");
    }
    return any;
}
