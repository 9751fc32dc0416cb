/* The whole BitNet b1.58 forward in C (bitnet.h): embedding, per block RMSNorm -> int8 activations
 * -> ternary q/k/v (I2V kernels) -> RoPE -> attention over the KV cache -> sub-norm -> o, then
 * RMSNorm -> gate/up -> relu2 (or SiLU) gating -> sub-norm -> down, residuals, the final norm and the
 * head. It mirrors model.py step for step, so the logits equal the torch reference path's up to
 * float rounding (the integer sums are exact; only float reductions differ in order).
 *
 * The float loops are compiled for several instruction sets (target_clones) and picked at load
 * time; the ternary products are the I2V kernels; the int8 head uses AVX-512 VNNI where present. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet.h"
#include "i2v.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define VEC __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define VEC
#endif

typedef struct {
    const uint8_t *w;
    int N, K;
    float scale;
} bn_linear;

typedef struct {
    const float *attn_norm, *ffn_norm, *attn_sub_norm, *ffn_sub_norm;
    bn_linear proj[7]; /* q k v o gate up down */
    float *kc, *vc;    /* [kv_heads, max_len, head_dim] */
} bn_layer;

struct bn_model {
    int L, H, I, nh, nkv, hd, V, max_len, act, embed_kind, head_kind, path;
    float eps;
    const float *cos, *sin, *final_norm;
    const void *embed, *head;
    const float *head_scale;
    const int32_t *head_rowsum;
    bn_layer *layers;
};

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

#define PTR(T, v) ((T)(uintptr_t)(v))

bn_model *bn_model_new(const int64_t *ints, int nints, const double *flts, int nflts) {
    if (nints < BN_NI) return NULL;
    int L = (int)ints[BN_I_LAYERS];
    if (L < 0 || nints != BN_NI + BN_NL * L || nflts != 1 + 7 * L) return NULL;
    bn_model *m = (bn_model *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->L = L;
    m->H = (int)ints[BN_I_HIDDEN];
    m->I = (int)ints[BN_I_INTER];
    m->nh = (int)ints[BN_I_HEADS];
    m->nkv = (int)ints[BN_I_KV_HEADS];
    m->hd = (int)ints[BN_I_HEAD_DIM];
    m->V = (int)ints[BN_I_VOCAB];
    m->max_len = (int)ints[BN_I_MAX_LEN];
    m->act = (int)ints[BN_I_ACT];
    m->embed_kind = (int)ints[BN_I_EMBED_KIND];
    m->head_kind = (int)ints[BN_I_HEAD_KIND];
    m->path = (int)ints[BN_I_PATH];
    m->eps = (float)flts[0];
    m->cos = PTR(const float *, ints[BN_I_ROPE_COS]);
    m->sin = PTR(const float *, ints[BN_I_ROPE_SIN]);
    m->final_norm = PTR(const float *, ints[BN_I_FINAL_NORM]);
    m->embed = PTR(const void *, ints[BN_I_EMBED]);
    m->head = PTR(const void *, ints[BN_I_HEAD]);
    m->head_scale = PTR(const float *, ints[BN_I_HEAD_SCALE]);
    m->head_rowsum = PTR(const int32_t *, ints[BN_I_HEAD_ROWSUM]);
    if (m->H <= 0 || m->I <= 0 || m->nh <= 0 || m->nkv <= 0 || m->nh % m->nkv || m->hd <= 0 || m->hd % 2 ||
        m->V <= 0 || m->max_len <= 0 || m->act < 0 || m->act > 1 || m->embed_kind < 0 || m->embed_kind > 1 ||
        m->head_kind < 0 || m->head_kind > 2 || (m->head_kind == BN_Q8 && (!m->head_scale || !m->head_rowsum)) ||
        !m->embed || !m->head || !m->cos || !m->sin || !m->final_norm) {
        free(m);
        return NULL;
    }
    m->layers = (bn_layer *)calloc((size_t)(L ? L : 1), sizeof(bn_layer));
    if (!m->layers) {
        free(m);
        return NULL;
    }
    int q = m->nh * m->hd, kv = m->nkv * m->hd;
    int shapes[7][2] = {{q, m->H}, {kv, m->H}, {kv, m->H}, {m->H, q}, {m->I, m->H}, {m->I, m->H}, {m->H, m->I}};
    for (int l = 0; l < L; l++) {
        const int64_t *li = ints + BN_NI + BN_NL * l;
        bn_layer *y = &m->layers[l];
        y->attn_norm = PTR(const float *, li[BN_L_ATTN_NORM]);
        y->ffn_norm = PTR(const float *, li[BN_L_FFN_NORM]);
        y->attn_sub_norm = PTR(const float *, li[BN_L_ATTN_SUB_NORM]);
        y->ffn_sub_norm = PTR(const float *, li[BN_L_FFN_SUB_NORM]);
        for (int j = 0; j < 7; j++) {
            y->proj[j].w = PTR(const uint8_t *, li[BN_L_Q + j]);
            y->proj[j].N = shapes[j][0];
            y->proj[j].K = shapes[j][1];
            y->proj[j].scale = (float)flts[1 + 7 * l + j];
        }
        y->kc = PTR(float *, li[BN_L_KCACHE]);
        y->vc = PTR(float *, li[BN_L_VCACHE]);
    }
    return m;
}

void bn_model_free(bn_model *m) {
    if (!m) return;
    free(m->layers);
    free(m);
}

/* ---- float helpers (vectorised per instruction set) ----------------------------------------- */
VEC static void rmsnorm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

VEC static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

VEC static void axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

VEC static float dot_bf16(const uint16_t *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        uint32_t u = (uint32_t)a[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        s += f * b[i];
    }
    return s;
}

static float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- ternary projection: y[t, :] = (q[t] . W^T) * (scale / s[t]) ---------------------------- */
static int project(const bn_model *m, const bn_linear *p, const int8_t *q, size_t ldq, const float *s,
                   const int32_t *qsum, int T, int32_t *acc, float *y, size_t ldy) {
    int rc = i2v_gemm(q, ldq, qsum, T, p->K, p->w, p->N, acc, (size_t)p->N, m->path);
    if (rc) return rc;
    for (int t = 0; t < T; t++) {
        float f = p->scale / s[t];
        const int32_t *a = acc + (size_t)t * p->N;
        float *yt = y + (size_t)t * ldy;
        for (int n = 0; n < p->N; n++) yt[n] = (float)a[n] * f;
    }
    return 0;
}

static void rope(float *v, const float *cos, const float *sin, int hd) {
    int h2 = hd / 2;
    for (int i = 0; i < h2; i++) {
        float x1 = v[i], x2 = v[i + h2];
        v[i] = x1 * cos[i] - x2 * sin[i];
        v[i + h2] = x2 * cos[i + h2] + x1 * sin[i + h2];
    }
}

/* ---- attention: one part = a range of (token, head) pairs ------------------------------------ */
typedef struct {
    const bn_model *m;
    const bn_layer *y;
    const float *q; /* [T, nh*hd] */
    float *out;     /* [T, nh*hd] */
    float *scores;  /* [nparts, max_len] */
    int T, pos;
} attn_task;

static void attn_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    const bn_model *m = a->m;
    int total = a->T * m->nh, group = m->nh / m->nkv, hd = m->hd;
    long i0 = (long)total * part / np, i1 = (long)total * (part + 1) / np;
    float *sc = a->scores + (size_t)part * m->max_len;
    float scale = 1.0f / sqrtf((float)hd);
    for (long i = i0; i < i1; i++) {
        int t = (int)(i / m->nh), h = (int)(i % m->nh), kvh = h / group;
        int n = a->pos + t + 1; /* keys 0 .. pos + t */
        const float *q = a->q + (size_t)t * m->nh * hd + (size_t)h * hd;
        const float *K = a->y->kc + (size_t)kvh * m->max_len * hd;
        const float *Vv = a->y->vc + (size_t)kvh * m->max_len * hd;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            sc[j] = dot(q, K + (size_t)j * hd, hd) * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        float sum = 0.0f;
        for (int j = 0; j < n; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        float *o = a->out + (size_t)t * m->nh * hd + (size_t)h * hd;
        memset(o, 0, sizeof(float) * hd);
        float inv = 1.0f / sum;
        for (int j = 0; j < n; j++) axpy(o, sc[j] * inv, Vv + (size_t)j * hd, hd);
    }
}

/* ---- the head: logits[t, v] = h[t] . E[v] ---------------------------------------------------- */
typedef struct {
    const bn_model *m;
    const float *h;     /* [T, H] normed hidden states (float heads) */
    const uint8_t *u;   /* [T, Kp] int8 activations + 128, as unsigned (int8 head) */
    const float *s;     /* [T] activation scales (int8 head) */
    size_t ldu;
    float *logits;      /* [T, V] */
    int T;
} head_task;

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
/* four rows at a time: acc_r += u (unsigned) * e_r (signed), 64 bytes per step */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void head_q8_vnni(const head_task *a, int v0, int v1) {
    const bn_model *m = a->m;
    const int8_t *E = (const int8_t *)m->head;
    int H = m->H, full = H / 64, tail = H % 64;
    __mmask64 tm = tail ? (((__mmask64)1 << tail) - 1) : 0;
    for (int t = 0; t < a->T; t++) {
        const uint8_t *u = a->u + (size_t)t * a->ldu;
        float inv = 1.0f / a->s[t];
        float *lg = a->logits + (size_t)t * m->V;
        int v = v0;
        for (; v + 4 <= v1; v += 4) {
            const int8_t *e0 = E + (size_t)v * H, *e1 = e0 + H, *e2 = e1 + H, *e3 = e2 + H;
            __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
            for (int k = 0; k < full; k++) {
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
            int32_t r[4] = {_mm512_reduce_add_epi32(c0), _mm512_reduce_add_epi32(c1),
                            _mm512_reduce_add_epi32(c2), _mm512_reduce_add_epi32(c3)};
            for (int j = 0; j < 4; j++)
                lg[v + j] = (float)(r[j] - 128 * m->head_rowsum[v + j]) * (m->head_scale[v + j] * inv);
        }
        for (; v < v1; v++) {
            const int8_t *e = E + (size_t)v * H;
            int32_t acc = 0;
            for (int k = 0; k < H; k++) acc += (int32_t)u[k] * e[k];
            lg[v] = (float)(acc - 128 * m->head_rowsum[v]) * (m->head_scale[v] * inv);
        }
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

static void head_part(void *ctx, int part, int np) {
    const head_task *a = (const head_task *)ctx;
    const bn_model *m = a->m;
    int v0 = (int)((long)m->V * part / np), v1 = (int)((long)m->V * (part + 1) / np);
    if (m->head_kind == BN_Q8) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
        int path = m->path < 0 ? i2v_best_path() : m->path;
        if (path == I2V_PATH_AVX512VNNI) {
            head_q8_vnni(a, v0, v1);
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
            lg[v] = m->head_kind == BN_F32 ? dot((const float *)m->head + (size_t)v * m->H, h, m->H)
                                           : dot_bf16((const uint16_t *)m->head + (size_t)v * m->H, h, m->H);
    }
}

/* ---- the forward ------------------------------------------------------------------------------ */
static size_t kpad(int k) { return (size_t)((k + I2V_COLS - 1) / I2V_COLS) * I2V_COLS; }

static int forward(const bn_model *m, const int32_t *tokens, int T, int pos, float *hidden_out, float *logits,
                   int n_out) {
    if (T <= 0 || pos < 0 || pos + T > m->max_len || n_out < 0 || n_out > T) return -1;
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->V) return -1;
    int H = m->H, I = m->I, hd = m->hd, qn = m->nh * hd, kvn = m->nkv * hd;
    int wide = I > H ? I : H;
    if (qn > wide) wide = qn;
    size_t kp = kpad(wide);
    int threads = i2v_pool_threads();
    int attn_parts = T * m->nh < 4 * threads ? T * m->nh : 4 * threads;
    /* scratch, one allocation */
    size_t n_x = (size_t)T * H, n_xn = (size_t)T * wide, n_q8 = (size_t)T * kp, n_acc = (size_t)T * wide;
    size_t n_qkv = (size_t)T * (qn + 2 * kvn), n_att = (size_t)T * (qn > H ? qn : H), n_g = (size_t)T * I;
    size_t bytes = 4 * (n_x + n_xn + n_acc + n_qkv + n_att + 2 * n_g + 2 * (size_t)T) + n_q8 +
                   4 * (size_t)attn_parts * m->max_len + 64 * 8;
    char *buf = (char *)malloc(bytes);
    if (!buf) return -2;
    char *p = buf;
#define TAKE(T_, n_) ((T_ *)(p = (char *)(((uintptr_t)(p) + 63) & ~(uintptr_t)63), p += (n_) * sizeof(T_), p - (n_) * sizeof(T_)))
    float *x = TAKE(float, n_x), *xn = TAKE(float, n_xn), *qkv = TAKE(float, n_qkv), *att = TAKE(float, n_att);
    float *g = TAKE(float, n_g), *u = TAKE(float, n_g), *s = TAKE(float, T), *scores = TAKE(float, (size_t)attn_parts * m->max_len);
    int32_t *acc = TAKE(int32_t, n_acc), *qsum = TAKE(int32_t, T);
    int8_t *q8 = TAKE(int8_t, n_q8);
#undef TAKE
    int rc = 0;
    /* embedding */
    for (int t = 0; t < T; t++) {
        float *xt = x + (size_t)t * H;
        if (m->embed_kind == BN_F32)
            memcpy(xt, (const float *)m->embed + (size_t)tokens[t] * H, sizeof(float) * H);
        else
            for (int i = 0; i < H; i++) xt[i] = bf16_to_f32(((const uint16_t *)m->embed)[(size_t)tokens[t] * H + i]);
    }
    size_t ldqkv = (size_t)(qn + 2 * kvn);
    for (int l = 0; l < m->L && !rc; l++) {
        const bn_layer *y = &m->layers[l];
        /* attention */
        for (int t = 0; t < T; t++) rmsnorm(x + (size_t)t * H, y->attn_norm, xn + (size_t)t * H, H, m->eps);
        if ((rc = i2v_quantize(xn, (size_t)H, T, H, q8, kpad(H), s, qsum, m->path))) break;
        if ((rc = project(m, &y->proj[P_Q], q8, kpad(H), s, qsum, T, acc, qkv, ldqkv))) break;
        if ((rc = project(m, &y->proj[P_K], q8, kpad(H), s, qsum, T, acc, qkv + qn, ldqkv))) break;
        if ((rc = project(m, &y->proj[P_V], q8, kpad(H), s, qsum, T, acc, qkv + qn + kvn, ldqkv))) break;
        for (int t = 0; t < T; t++) {
            int ps = pos + t;
            float *qt = qkv + (size_t)t * ldqkv, *kt = qt + qn, *vt = kt + kvn;
            const float *c = m->cos + (size_t)ps * hd, *sn = m->sin + (size_t)ps * hd;
            for (int h = 0; h < m->nh; h++) rope(qt + (size_t)h * hd, c, sn, hd);
            for (int h = 0; h < m->nkv; h++) {
                rope(kt + (size_t)h * hd, c, sn, hd);
                memcpy(y->kc + ((size_t)h * m->max_len + ps) * hd, kt + (size_t)h * hd, sizeof(float) * hd);
                memcpy(y->vc + ((size_t)h * m->max_len + ps) * hd, vt + (size_t)h * hd, sizeof(float) * hd);
            }
        }
        /* gather q contiguously for the attention task */
        for (int t = 0; t < T; t++) memcpy(xn + (size_t)t * qn, qkv + (size_t)t * ldqkv, sizeof(float) * qn);
        attn_task at = {m, y, xn, att, scores, T, pos};
        i2v_pool_run(attn_part, &at, attn_parts);
        for (int t = 0; t < T; t++) rmsnorm(att + (size_t)t * qn, y->attn_sub_norm, xn + (size_t)t * qn, qn, m->eps);
        if ((rc = i2v_quantize(xn, (size_t)qn, T, qn, q8, kpad(qn), s, qsum, m->path))) break;
        if ((rc = project(m, &y->proj[P_O], q8, kpad(qn), s, qsum, T, acc, att, (size_t)H))) break;
        for (size_t i = 0; i < n_x; i++) x[i] += att[i];
        /* feed-forward */
        for (int t = 0; t < T; t++) rmsnorm(x + (size_t)t * H, y->ffn_norm, xn + (size_t)t * H, H, m->eps);
        if ((rc = i2v_quantize(xn, (size_t)H, T, H, q8, kpad(H), s, qsum, m->path))) break;
        if ((rc = project(m, &y->proj[P_GATE], q8, kpad(H), s, qsum, T, acc, g, (size_t)I))) break;
        if ((rc = project(m, &y->proj[P_UP], q8, kpad(H), s, qsum, T, acc, u, (size_t)I))) break;
        for (size_t i = 0; i < n_g; i++) {
            float a = g[i];
            a = m->act == 0 ? (a > 0.0f ? a * a : 0.0f) : a / (1.0f + expf(-a));
            g[i] = a * u[i];
        }
        for (int t = 0; t < T; t++) rmsnorm(g + (size_t)t * I, y->ffn_sub_norm, xn + (size_t)t * I, I, m->eps);
        if ((rc = i2v_quantize(xn, (size_t)I, T, I, q8, kpad(I), s, qsum, m->path))) break;
        if ((rc = project(m, &y->proj[P_DOWN], q8, kpad(I), s, qsum, T, acc, att, (size_t)H))) break;
        for (size_t i = 0; i < n_x; i++) x[i] += att[i];
    }
    if (!rc && hidden_out)
        for (int t = 0; t < T; t++) rmsnorm(x + (size_t)t * H, m->final_norm, hidden_out + (size_t)t * H, H, m->eps);
    if (!rc && logits && n_out > 0) {
        int t0 = T - n_out;
        for (int t = 0; t < n_out; t++) rmsnorm(x + (size_t)(t0 + t) * H, m->final_norm, xn + (size_t)t * H, H, m->eps);
        head_task ht = {m, xn, NULL, NULL, 0, logits, n_out};
        if (m->head_kind == BN_Q8) {
            /* per-token int8 activations, shifted to unsigned for vpdpbusd; the shift is undone with
             * the precomputed row sums */
            size_t ldu = kpad(H);
            if ((rc = i2v_quantize(xn, (size_t)H, n_out, H, q8, ldu, s, qsum, m->path)) == 0) {
                for (size_t i = 0; i < (size_t)n_out * ldu; i++) ((uint8_t *)q8)[i] = (uint8_t)(q8[i] + 128);
                ht.u = (const uint8_t *)q8;
                ht.s = s;
                ht.ldu = ldu;
            }
        }
        if (!rc) i2v_pool_run(head_part, &ht, 4 * threads);
    }
    free(buf);
    return rc;
}

int bn_forward(const bn_model *m, const int32_t *tokens, int T, int pos, float *logits, int n_out) {
    return forward(m, tokens, T, pos, NULL, logits, n_out);
}

int bn_forward_hidden(const bn_model *m, const int32_t *tokens, int T, int pos, float *hidden) {
    return forward(m, tokens, T, pos, hidden, NULL, 0);
}
