/* The output head (bitnet_impl.h): logits[t, v] = h[t] . E[v], with E float32, bf16, int8 or 6-bit
 * rows. Each logit is one row's own computation (the int8 and 6-bit sums are exact integers, then
 * scaled per row), so a row's logits do not depend on how many rows there are. */
#include <stdlib.h>
#include <string.h>

#include "bitnet_impl.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* ---- the head: logits[t, v] = h[t] . E[v] ---------------------------------------------------- */
static int head_path(const bn_model *m) { return m->path < 0 ? i2v_best_path() : m->path; } /* -1: the best */

typedef struct {
    const bn_model *m;
    const float *h;     /* [T, H] normed hidden states (float heads) */
    const uint8_t *u;   /* [T, ldu] int8 activations + 128, as unsigned (int8 head, VNNI and scalar) */
    const int8_t *x;    /* [T, ldu] the int8 activations themselves (int8 head, AVX2) ... */
    const int8_t *ax;   /* ... and their magnitudes |x| */
    const float *s;     /* [T] activation scales (int8 head) */
    size_t ldu;
    float *logits;      /* [T, V] */
    int T;
} head_task;

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* the four int32 sums of c0..c3, as one vector [sum c0, sum c1, sum c2, sum c3]: one reduction tree for
 * the four instead of four (integer adds: any order gives the same sums) */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __m128i reduce4(__m512i c0, __m512i c1,
                                                                                  __m512i c2, __m512i c3) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(c0, c1), _mm512_unpackhi_epi32(c0, c1));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c2, c3), _mm512_unpackhi_epi32(c2, c3));
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* One token (decode): rows v[0 .. NR) side by side, acc_r += u (unsigned) * e_r (signed), 64 bytes per
 * step, each row prefetched Q8_HEAD_PF bytes ahead (past its end, into the next row of its quarter) */
#define Q8_HEAD_PF 1536
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline void head_q8_vnni_rows(const head_task *a,
                                                                                          const int *v, const int NR) {
    const bn_model *m = a->m;
    int H = m->H, full = H / 64, tail = H % 64;
    __mmask64 tm = tail ? (((__mmask64)1 << tail) - 1) : 0;
    const int8_t *e[4];
    __m512i c[4];
    for (int r = 0; r < 4; r++) {
        e[r] = (const int8_t *)m->head + (size_t)v[r < NR ? r : 0] * H;
        c[r] = _mm512_setzero_si512();
    }
    for (int k = 0; k < full; k++) {
        __m512i x = _mm512_loadu_si512(a->u + 64 * k);
        for (int r = 0; r < NR; r++) {
            _mm_prefetch((const char *)(e[r] + 64 * k + Q8_HEAD_PF), _MM_HINT_T0);
            c[r] = _mm512_dpbusd_epi32(c[r], x, _mm512_loadu_si512(e[r] + 64 * k));
        }
    }
    if (tail) {
        __m512i x = _mm512_maskz_loadu_epi8(tm, a->u + 64 * full);
        for (int r = 0; r < NR; r++) c[r] = _mm512_dpbusd_epi32(c[r], x, _mm512_maskz_loadu_epi8(tm, e[r] + 64 * full));
    }
    int32_t s[4];
    _mm_storeu_si128((__m128i *)s, reduce4(c[0], c[1], c[2], c[3]));
    float inv = 1.0f / a->s[0];
    for (int r = 0; r < NR; r++)
        a->logits[v[r]] = (float)(s[r] - 128 * m->head_rowsum[v[r]]) * (m->head_scale[v[r]] * inv);
}

/* four rows at a time: acc_r += u (unsigned) * e_r (signed), 64 bytes per step. The four rows of E
 * stay in L1 while every token's row passes over them (several tokens: a batch). One token: the rows in
 * four quarters, row i of each side by side (four long streams, as the AVX2 kernel), prefetched. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void head_q8_vnni(const head_task *a, int v0, int v1) {
    if (a->T == 1) {
        int q = (v1 - v0) / 4;
        for (int i = 0; i < q; i++) head_q8_vnni_rows(a, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) head_q8_vnni_rows(a, (const int[]){v}, 1);
        return;
    }
    const bn_model *m = a->m;
    const int8_t *E = (const int8_t *)m->head;
    int H = m->H, full = H / 64, tail = H % 64;
    __mmask64 tm = tail ? (((__mmask64)1 << tail) - 1) : 0;
    int v = v0;
    for (; v + 4 <= v1; v += 4) {
        const int8_t *e0 = E + (size_t)v * H, *e1 = e0 + H, *e2 = e1 + H, *e3 = e2 + H;
        /* the first token's pass fetches the next four rows while it computes (the others' passes find
         * them in cache, and the memory would otherwise wait for the compute) */
        const int8_t *pf = v + 8 <= v1 ? e0 + 4 * (size_t)H : NULL;
        for (int t = 0; t < a->T; t++, pf = NULL) {
            const uint8_t *u = a->u + (size_t)t * a->ldu;
            __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
            for (int k = 0; k < full; k++) {
                if (pf) {
                    _mm_prefetch((const char *)(pf + 64 * k), _MM_HINT_T0);
                    _mm_prefetch((const char *)(pf + H + 64 * k), _MM_HINT_T0);
                    _mm_prefetch((const char *)(pf + 2 * (size_t)H + 64 * k), _MM_HINT_T0);
                    _mm_prefetch((const char *)(pf + 3 * (size_t)H + 64 * k), _MM_HINT_T0);
                }
                __m512i x = _mm512_loadu_si512(u + 64 * k);
                c0 = _mm512_dpbusd_epi32(c0, x, _mm512_loadu_si512(e0 + 64 * k));
                c1 = _mm512_dpbusd_epi32(c1, x, _mm512_loadu_si512(e1 + 64 * k));
                c2 = _mm512_dpbusd_epi32(c2, x, _mm512_loadu_si512(e2 + 64 * k));
                c3 = _mm512_dpbusd_epi32(c3, x, _mm512_loadu_si512(e3 + 64 * k));
            }
            if (tail) {
                __m512i x = _mm512_maskz_loadu_epi8(tm, u + 64 * full);
                c0 = _mm512_dpbusd_epi32(c0, x, _mm512_maskz_loadu_epi8(tm, e0 + 64 * full));
                c1 = _mm512_dpbusd_epi32(c1, x, _mm512_maskz_loadu_epi8(tm, e1 + 64 * full));
                c2 = _mm512_dpbusd_epi32(c2, x, _mm512_maskz_loadu_epi8(tm, e2 + 64 * full));
                c3 = _mm512_dpbusd_epi32(c3, x, _mm512_maskz_loadu_epi8(tm, e3 + 64 * full));
            }
            int32_t r[4];
            _mm_storeu_si128((__m128i *)r, reduce4(c0, c1, c2, c3));
            float inv = 1.0f / a->s[t], *lg = a->logits + (size_t)t * m->V;
            for (int j = 0; j < 4; j++)
                lg[v + j] = (float)(r[j] - 128 * m->head_rowsum[v + j]) * (m->head_scale[v + j] * inv);
        }
    }
    for (; v < v1; v++) {
        const int8_t *e = E + (size_t)v * H;
        for (int t = 0; t < a->T; t++) {
            const uint8_t *u = a->u + (size_t)t * a->ldu;
            int32_t acc = 0;
            for (int k = 0; k < H; k++) acc += (int32_t)u[k] * e[k];
            a->logits[(size_t)t * m->V + v] = (float)(acc - 128 * m->head_rowsum[v]) * (m->head_scale[v] * (1.0f / a->s[t]));
        }
    }
}

/* AVX2 has no vpdpbusd, and u * e in vpmaddubsw would saturate: multiply |x| (unsigned) by e
 * carrying x's sign, at most 2 * 127 * 127 per pair (|x|, |e| <= 127). Sums are the signed x . e, so
 * no row-sum correction. x and |x| come made once per token by the caller. The rows in four quarters,
 * row i of each side by side: four streams from memory, which this core reads faster than one; each
 * prefetched Q8_HEAD_PF bytes ahead (a line every other 32-byte step). */
__attribute__((target("avx2,fma"))) static inline void head_q8_avx2_rows(const head_task *a, int t, const int *v,
                                                                       const int NR) {
    const bn_model *m = a->m;
    int H = m->H, full = H / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xt = a->x + (size_t)t * a->ldu, *axt = a->ax + (size_t)t * a->ldu;
    const int8_t *e[4];
    __m256i c[4];
    for (int r = 0; r < NR; r++) {
        e[r] = (const int8_t *)m->head + (size_t)v[r] * H;
        c[r] = _mm256_setzero_si256();
    }
    for (int k = 0; k < full; k++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xt + 32 * k));
        __m256i ax = _mm256_loadu_si256((const __m256i *)(axt + 32 * k));
        for (int r = 0; r < NR; r++) {
            if (k % 2 == 0) _mm_prefetch((const char *)(e[r] + 32 * k + Q8_HEAD_PF), _MM_HINT_T0);
            __m256i w = _mm256_loadu_si256((const __m256i *)(e[r] + 32 * k));
            c[r] = _mm256_add_epi32(c[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), ones));
        }
    }
    float inv = 1.0f / a->s[t];
    for (int r = 0; r < NR; r++) {
        __m128i q = _mm_add_epi32(_mm256_castsi256_si128(c[r]), _mm256_extracti128_si256(c[r], 1));
        q = _mm_hadd_epi32(q, q);
        q = _mm_hadd_epi32(q, q);
        int32_t acc = _mm_cvtsi128_si32(q);
        for (int k = 32 * full; k < H; k++) acc += (int32_t)xt[k] * e[r][k];
        a->logits[(size_t)t * m->V + v[r]] = (float)acc * (m->head_scale[v[r]] * inv);
    }
}

__attribute__((target("avx2,fma"))) static void head_q8_avx2(const head_task *a, int v0, int v1) {
    int q = (v1 - v0) / 4;
    for (int t = 0; t < a->T; t++) {
        for (int i = 0; i < q; i++) head_q8_avx2_rows(a, t, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) head_q8_avx2_rows(a, t, (const int[]){v}, 1);
    }
}
#endif

#if defined(__aarch64__) && defined(__GNUC__)
/* NEON (sdot on the int8 activations themselves): a token's rows in four quarters side by side, four long
 * streams, as head_q8_avx2; the same exact sums and scaling as the scalar kernel */
static void head_q8_neon_rows(const head_task *a, int t, const int *v, const int NR) {
    const bn_model *m = a->m;
    const int8_t *e[4];
    int32_t acc[4];
    for (int r = 0; r < NR; r++) e[r] = (const int8_t *)m->head + (size_t)v[r] * m->H;
    i2v_q8_rows_neon(a->x + (size_t)t * a->ldu, e, NR, m->H, acc);
    float inv = 1.0f / a->s[t];
    for (int r = 0; r < NR; r++) a->logits[(size_t)t * m->V + v[r]] = (float)acc[r] * (m->head_scale[v[r]] * inv);
}

static void head_q8_neon(const head_task *a, int v0, int v1) {
    int q = (v1 - v0) / 4;
    for (int t = 0; t < a->T; t++) {
        for (int i = 0; i < q; i++) head_q8_neon_rows(a, t, (const int[]){v0 + i, v0 + q + i, v0 + 2 * q + i, v0 + 3 * q + i}, 4);
        for (int v = v0 + 4 * q; v < v1; v++) head_q8_neon_rows(a, t, (const int[]){v}, 1);
    }
}
#endif

static void head_q8_scalar(const head_task *a, int v0, int v1) {
    const bn_model *m = a->m;
    const int8_t *E = (const int8_t *)m->head;
    for (int t = 0; t < a->T; t++) {
        const uint8_t *u = a->u + (size_t)t * a->ldu;
        float inv = 1.0f / a->s[t];
        for (int v = v0; v < v1; v++) {
            const int8_t *e = E + (size_t)v * m->H;
            int32_t acc = 0;
            for (int k = 0; k < m->H; k++) acc += (int32_t)u[k] * e[k];
            a->logits[(size_t)t * m->V + v] = (float)(acc - 128 * m->head_rowsum[v]) * (m->head_scale[v] * inv);
        }
    }
}

/* rows v0 .. v1-1 of the head for every row t */
static void head_rows(const head_task *a, int v0, int v1) {
    const bn_model *m = a->m;
    if (m->head_kind == BN_Q8) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
        int path = head_path(m);
        if (i2v_path_has_avx512vnni(path)) {  /* AMX too: it implies VNNI */
            head_q8_vnni(a, v0, v1);
            return;
        }
        if (path == I2V_PATH_AVX2) {
            head_q8_avx2(a, v0, v1);
            return;
        }
#endif
#if defined(__aarch64__) && defined(__GNUC__)
        if (head_path(m) == I2V_PATH_NEON) {
            head_q8_neon(a, v0, v1);
            return;
        }
#endif
        head_q8_scalar(a, v0, v1);
        return;
    }
    for (int t = 0; t < a->T; t++) {
        const float *h = a->h + (size_t)t * m->H;
        float *lg = a->logits + (size_t)t * m->V;
        for (int v = v0; v < v1; v++)
            lg[v] = m->head_kind == BN_F32 ? m->dot((const float *)m->head + (size_t)v * m->H, h, m->H)
                                           : bn_dot_bf16((const uint16_t *)m->head + (size_t)v * m->H, h, m->H);
    }
}

/* With several rows (a batch of sequences), the head is taken HEAD_BLOCK_BYTES of its rows at a time
 * for all of them: read from memory once, then from cache for the other rows, where a pass per row
 * would read the whole head (hundreds of MB at 2B4T) again for each. Every logit is computed as with
 * one row, so the blocking changes no value. */
#define HEAD_BLOCK_BYTES (128 << 10)

static int head_block_rows(const bn_model *m, size_t row_bytes) {
    int r = (int)(HEAD_BLOCK_BYTES / row_bytes) & ~3;
    return r < 4 ? 4 : r;
}

static void head_part(void *ctx, int part, int np) {
    const head_task *a = (const head_task *)ctx;
    const bn_model *m = a->m;
    int v0 = (int)((long)m->V * part / np), v1 = (int)((long)m->V * (part + 1) / np);
    if (a->T == 1) {
        head_rows(a, v0, v1);
        return;
    }
    size_t el = m->head_kind == BN_F32 ? 4 : m->head_kind == BN_BF16 ? 2 : 1;
    int step = head_block_rows(m, el * (size_t)m->H);
    for (int v = v0; v < v1; v += step) head_rows(a, v, v1 - v < step ? v1 : v + step);
}

/* the 6-bit head over several rows, blocked as above with the kernel i2v_q6_gemv would pick */
typedef struct {
    i2v_q6_args a;
    i2v_q6_fn fn;
    int step;
} q6_task;

static void q6_part(void *ctx, int part, int np) {
    const q6_task *t = (const q6_task *)ctx;
    long v0, v1;
    i2v_pool_split(t->a.V, part, np, &v0, &v1);
    for (long v = v0; v < v1; v += t->step) t->fn(&t->a, (int)v, (int)(v1 - v < t->step ? v1 : v + t->step));
}

static int q6_rows_blocked(const bn_model *m, const int8_t *x, size_t ldx, const int32_t *xsum, int n, int32_t *out) {
    int H = m->H;
    size_t hp = (size_t)(H + 63) / 64 * 64;
    q6_task t = {{(const uint8_t *)m->head, m->V, H, x, ldx, xsum, n, out, (size_t)m->V, NULL},
                 i2v_q6_kernel(head_path(m)), head_block_rows(m, hp / 64 * 48)};
    int16_t *x16 = NULL;
#if defined(__x86_64__) || defined(__i386__)
    if (t.fn == i2v_q6_avx2) {
        if (!(x16 = (int16_t *)malloc((size_t)n * hp * sizeof(int16_t)))) return -2;
        i2v_q6_avx2_x16(x, ldx, n, hp, x16);
        t.a.x16 = x16;
    }
#endif
    i2v_pool_run(q6_part, &t, 4 * i2v_pool_threads());
    free(x16);
    return 0;
}

int bn_head_needs_ax(const bn_model *m) {
    return m->head_kind == BN_Q8 && head_path(m) == I2V_PATH_AVX2;
}

int bn_head(const bn_model *m, const float *h, int n, int8_t *q8, float *s, int32_t *qsum, int8_t *ax,
            float *logits) {
    int H = m->H, rc = 0;
    head_task ht = {m, h, NULL, NULL, NULL, NULL, 0, logits, n};
    if (m->head_kind == BN_Q6) {
        /* 6-bit rows (formats/q6.py) times per-token int8 activations, exact int32, then
         * logits = acc * row_scale / s (the int32 sums are written into the logits themselves,
         * then converted in place) */
        size_t ld6 = (size_t)((H + 63) / 64) * 64;
        int32_t *acc6 = (int32_t *)(void *)logits;
        if (!(rc = i2v_quantize(h, (size_t)H, n, H, q8, ld6, s, qsum, m->path)) &&
            !(rc = n == 1 ? i2v_q6_gemv((const uint8_t *)m->head, m->V, H, q8, ld6, qsum, n, acc6, (size_t)m->V, m->path)
                          : q6_rows_blocked(m, q8, ld6, qsum, n, acc6))) {
            for (int t = 0; t < n; t++) {
                float inv = 1.0f / s[t], *lg = logits + (size_t)t * m->V;
                for (int v = 0; v < m->V; v++) {
                    int32_t a;
                    memcpy(&a, lg + v, 4);
                    lg[v] = (float)a * (m->head_scale[v] * inv);
                }
            }
        }
        return rc;
    }
    if (m->head_kind == BN_Q8) {
        /* per-token int8 activations: with |x| beside them for AVX2, as they are for NEON, else shifted
         * to unsigned for vpdpbusd (the shift is undone with the precomputed row sums) */
        size_t ldu = bn_kpad(H);
        if ((rc = i2v_quantize(h, (size_t)H, n, H, q8, ldu, s, qsum, m->path))) return rc;
        if (ax) {
            for (size_t i = 0; i < (size_t)n * ldu; i++) ax[i] = (int8_t)(q8[i] < 0 ? -q8[i] : q8[i]);
            ht.x = q8;
            ht.ax = ax;
        }
#if defined(__aarch64__) && defined(__GNUC__)
        else if (head_path(m) == I2V_PATH_NEON)
            ht.x = q8; /* sdot takes them signed (head_q8_neon) */
#endif
        else {
            for (size_t i = 0; i < (size_t)n * ldu; i++) ((uint8_t *)q8)[i] = (uint8_t)(q8[i] + 128);
            ht.u = (const uint8_t *)q8;
        }
        ht.s = s;
        ht.ldu = ldu;
    }
    i2v_pool_run(head_part, &ht, 4 * i2v_pool_threads());
    return 0;
}
