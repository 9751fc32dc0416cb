/* The whole BitNet b1.58 forward in C (bitnet.h): embedding, per block RMSNorm -> int8 activations
 * -> ternary q/k/v (I2V kernels) -> RoPE -> attention over the KV cache -> sub-norm -> o, then
 * RMSNorm -> gate/up -> relu2 (or SiLU) gating -> sub-norm -> down, residuals, the final norm and the
 * head. It mirrors model.py step for step, so the logits equal the torch reference path's up to
 * float rounding (the integer sums are exact; only float reductions differ in order).
 *
 * The float loops are compiled for several instruction sets (target_clones) and picked at load
 * time; the ternary products are the I2V kernels; the int8 head uses AVX-512 VNNI or AVX2 where present. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime and pread under -std=c11 */
#define _DEFAULT_SOURCE           /* MAP_ANONYMOUS, madvise */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bitnet.h"
#include "i2v.h"


typedef float (*dot_fn)(const float *, const float *, int);
/* out[r * ldo] = scale * (q_r . k) for the nq rows q_r = q + r * n (the q heads of one kv head) */
typedef void (*dots_fn)(const float *q, int nq, int n, const float *k, float scale, float *out, size_t ldo);
/* softmax numerators in place, s[j] = exp(s[j] - mx) for j < n; returns their sum */
typedef float (*expsum_fn)(float *s, int n, float mx);
/* o_r += sum over j < n of p[r * ldp + j] * v_j, for the nq rows o_r = o + r * hd and v_j = v + j * hd */
typedef void (*pv_fn)(float *o, int nq, int hd, const float *p, size_t ldp, const float *v, int n);
static dot_fn pick_dot(int path);
static dots_fn pick_dots(int path);
static void pick_attn(int path, expsum_fn *expsum, pv_fn *pv);
static void pick_cvt(int path, void (**h2f)(const void *, void *, int), void (**f2h)(const void *, void *, int));

typedef struct {
    const uint8_t *w;
    int N, K;
    float scale;
} bn_linear;

typedef struct {
    const float *attn_norm, *ffn_norm, *attn_sub_norm, *ffn_sub_norm;
    bn_linear proj[7]; /* q k v o gate up down */
    void *kc, *vc;     /* [kv_heads, max_len, head_dim], float32 or float16 (BN_I_KV_KIND) */
} bn_layer;

struct bn_model {
    int L, H, I, nh, nkv, hd, V, max_len, act, embed_kind, head_kind, path, kv_f16, embed_fd;
    int64_t embed_offset;
    float eps;
    const float *cos, *sin, *final_norm;
    const void *embed, *head;
    const float *head_scale;
    const int32_t *head_rowsum;
    bn_layer *layers;
    dot_fn dot;
    dots_fn dots;
    expsum_fn expsum;
    pv_fn pv;
    void (*h2f)(const void *, void *, int);
    void (*f2h)(const void *, void *, int);
    int profiling;
    int64_t prof[BN_NPROF];
    char *scratch; /* the forward's scratch, kept between calls (grown when a call needs more) */
    size_t scratch_bytes;
};

/* A private anonymous mapping on ordinary pages: resident only where it is written, returned to
 * the system when it is replaced, no malloc heap left holding freed megabytes, no page faults on
 * every call. */
static char *scratch_for(bn_model *m, size_t bytes) {
    if (bytes <= m->scratch_bytes) return m->scratch;
    if (m->scratch) munmap(m->scratch, m->scratch_bytes);
    size_t page = 1 << 16;
    bytes = (bytes + page - 1) / page * page;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        m->scratch = NULL;
        m->scratch_bytes = 0;
        return NULL;
    }
#ifdef MADV_NOHUGEPAGE
    madvise(p, bytes, MADV_NOHUGEPAGE); /* a huge page would make 2 MB resident for each touch */
#endif
    m->scratch = (char *)p;
    m->scratch_bytes = bytes;
    return m->scratch;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* charge the time since *t to phase ph (when profiling), and restart the clock */
#define LAP(ph)                                                                            \
    do {                                                                                   \
        if (m->profiling) {                                                                \
            int64_t t1_ = now_ns();                                                        \
            ((bn_model *)m)->prof[ph] += t1_ - tlap;                                       \
            tlap = t1_;                                                                    \
        }                                                                                  \
    } while (0)

void bn_profile(bn_model *m, int enable, int64_t *out, int reset) {
    if (out) memcpy(out, m->prof, sizeof m->prof);
    if (reset) memset(m->prof, 0, sizeof m->prof);
    if (enable >= 0) m->profiling = enable;
}

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
    m->kv_f16 = (int)ints[BN_I_KV_KIND] == BN_F16;
    m->eps = (float)flts[0];
    m->dot = pick_dot(m->path < 0 ? i2v_best_path() : m->path);
    m->dots = pick_dots(m->path < 0 ? i2v_best_path() : m->path);
    pick_attn(m->path < 0 ? i2v_best_path() : m->path, &m->expsum, &m->pv);
    pick_cvt(m->path < 0 ? i2v_best_path() : m->path, &m->h2f, &m->f2h);
    m->cos = PTR(const float *, ints[BN_I_ROPE_COS]);
    m->sin = PTR(const float *, ints[BN_I_ROPE_SIN]);
    m->final_norm = PTR(const float *, ints[BN_I_FINAL_NORM]);
    m->embed = PTR(const void *, ints[BN_I_EMBED]);
    m->embed_fd = (int)ints[BN_I_EMBED_FD];
    m->embed_offset = ints[BN_I_EMBED_OFFSET];
    m->head = PTR(const void *, ints[BN_I_HEAD]);
    m->head_scale = PTR(const float *, ints[BN_I_HEAD_SCALE]);
    m->head_rowsum = PTR(const int32_t *, ints[BN_I_HEAD_ROWSUM]);
    if (m->H <= 0 || m->I <= 0 || m->nh <= 0 || m->nkv <= 0 || m->nh % m->nkv || m->hd <= 0 || m->hd % 2 ||
        m->V <= 0 || m->max_len <= 0 || m->hd > 1024 || (ints[BN_I_KV_KIND] != BN_F32 && ints[BN_I_KV_KIND] != BN_F16) || m->act < 0 || m->act > 1 || m->embed_kind < 0 || m->embed_kind > 1 ||
        m->head_kind < 0 || m->head_kind > 4 || m->head_kind == BN_F16 ||
        (m->head_kind == BN_Q8 && (!m->head_scale || !m->head_rowsum)) || (m->head_kind == BN_Q6 && !m->head_scale) ||
        (!m->embed && m->embed_fd < 0) || m->embed_offset < 0 || !m->head || !m->cos || !m->sin || !m->final_norm) {
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
        y->kc = PTR(void *, li[BN_L_KCACHE]);
        y->vc = PTR(void *, li[BN_L_VCACHE]);
    }
    return m;
}

void bn_model_free(bn_model *m) {
    if (!m) return;
    if (m->scratch) munmap(m->scratch, m->scratch_bytes);
    free(m->layers);
    free(m);
}

/* ---- float helpers ---------------------------------------------------------------------------
 * A float sum is not vectorised by the compiler without -ffast-math (it may not reorder the
 * additions), so the dot product is written per instruction set with independent accumulators and
 * picked once at model creation; loops without a reduction are left to target_clones. */
static float dot_scalar(const float *a, const float *b, int n) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx512f"))) static float dot_avx512(const float *a, const float *b, int n) {
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
        c1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), c1);
    }
    if (i + 16 <= n) {
        c0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), c0);
        i += 16;
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        c1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), c1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int n) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), c1);
    }
    __m256 c = _mm256_add_ps(c0, c1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

static void dots_scalar(const float *q, int nq, int n, const float *k, float scale, float *out, size_t ldo) {
    for (int r = 0; r < nq; r++) out[(size_t)r * ldo] = dot_scalar(q + (size_t)r * n, k, n) * scale;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* four q rows per pass over k: each 8 floats of k loaded once for the four, two accumulators a row */
__attribute__((target("avx2,fma"))) static void dots_avx2(const float *q, int nq, int n, const float *k, float scale,
                                                          float *out, size_t ldo) {
    int n16 = n & ~15;
    for (int r0 = 0; r0 < nq; r0 += 4) {
        int nr = nq - r0 < 4 ? nq - r0 : 4;
        const float *q0 = q + (size_t)r0 * n;
        const float *qr[4] = {q0, q0 + (nr > 1 ? n : 0), q0 + (nr > 2 ? 2 * n : 0), q0 + (nr > 3 ? 3 * n : 0)};
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
        for (int i = 0; i < n16; i += 16) {
            __m256 k0 = _mm256_loadu_ps(k + i), k1 = _mm256_loadu_ps(k + i + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[0] + i), k0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[0] + i + 8), k1, a1);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[1] + i), k0, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[1] + i + 8), k1, b1);
            c0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[2] + i), k0, c0);
            c1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[2] + i + 8), k1, c1);
            d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[3] + i), k0, d0);
            d1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr[3] + i + 8), k1, d1);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)),
                                  _mm256_hadd_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(d0, d1)));
        float r4[4];
        _mm_storeu_ps(r4, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        for (int r = 0; r < nr; r++) {
            float t = r4[r];
            for (int i = n16; i < n; i++) t += qr[r][i] * k[i];
            out[(size_t)(r0 + r) * ldo] = t * scale;
        }
    }
}
#endif

static dots_fn pick_dots(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path)) return dots_avx2;  /* AVX-512 CPUs have AVX2 */
#endif
    (void)path;
    return dots_scalar;
}

static dot_fn pick_dot(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) return dot_avx512;
    if (path == I2V_PATH_AVX2) return dot_avx2;
#endif
    (void)path;
    return dot_scalar;
}

/* float16 <-> float32 for the KV cache (round to nearest even) */
typedef void (*cvt_fn)(const void *, void *, int);

static void h2f_scalar(const void *src, void *dst, int n) {
    const _Float16 *h = (const _Float16 *)src;
    for (int i = 0; i < n; i++) ((float *)dst)[i] = (float)h[i];
}

static void f2h_scalar(const void *src, void *dst, int n) {
    for (int i = 0; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)((const float *)src)[i];
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
__attribute__((target("avx512f"))) static void h2f_avx512(const void *src, void *dst, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps((float *)dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i))));
    h2f_scalar((const uint16_t *)src + i, (float *)dst + i, n - i);
}

__attribute__((target("avx512f"))) static void f2h_avx512(const void *src, void *dst, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps((const float *)src + i), _MM_FROUND_TO_NEAREST_INT));
    f2h_scalar((const float *)src + i, (uint16_t *)dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void h2f_avx2(const void *src, void *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps((float *)dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))));
    h2f_scalar((const uint16_t *)src + i, (float *)dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void f2h_avx2(const void *src, void *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps((const float *)src + i), _MM_FROUND_TO_NEAREST_INT));
    f2h_scalar((const float *)src + i, (uint16_t *)dst + i, n - i);
}
#endif

static void pick_cvt(int path, cvt_fn *h2f, cvt_fn *f2h) {
    *h2f = h2f_scalar;
    *f2h = f2h_scalar;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) {
        *h2f = h2f_avx512;
        *f2h = f2h_avx512;
    } else if (path == I2V_PATH_AVX2 && __builtin_cpu_supports("f16c")) {
        *h2f = h2f_avx2;
        *f2h = f2h_avx2;
    }
#endif
}

#define NQ_MAX_PARTS 16
I2V_VEC static void rmsnorm(dot_fn dot, const float *restrict x, const float *restrict w, float *restrict out,
                            int n, float eps) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

I2V_VEC static void axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static float expsum_scalar(float *s, int n, float mx) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) { /* below -104 expf is 0, reached through libm's slow underflow path */
        float d = s[j] - mx;
        sum += (s[j] = d < -104.0f ? 0.0f : expf(d));
    }
    return sum;
}

static void pv_scalar(float *o, int nq, int hd, const float *p, size_t ldp, const float *v, int n) {
    for (int j = 0; j < n; j++)
        for (int r = 0; r < nq; r++) axpy(o + (size_t)r * hd, p[(size_t)r * ldp + j], v + (size_t)j * hd, hd);
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* exp(x) for x <= 0: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, then
 * 2^n into the exponent): within 1 ulp of the correctly rounded exp on every 64th float of (-87.3, 0]
 * (a throwaway check against double exp); 0 below -87.3 where the result would be subnormal */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpos_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

__attribute__((target("avx2,fma"))) static float expsum_avx2(float *s, int n, float mx) {
    __m256 m8 = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h) + expsum_scalar(s + j, n - j, mx);
}

/* four rows of o by 16 columns in registers while the n rows of v stream past: the outputs are
 * loaded and stored once per block of keys instead of once per key */
__attribute__((target("avx2,fma"))) static void pv_avx2(float *o, int nq, int hd, const float *p, size_t ldp,
                                                        const float *v, int n) {
    int h16 = hd & ~15;
    for (int r0 = 0; r0 < nq; r0 += 4) {
        int nr = nq - r0 < 4 ? nq - r0 : 4;
        /* short groups repeat their first row: the repeats compute and store the same values */
        const float *p0 = p + (size_t)r0 * ldp, *p1 = p0 + (nr > 1 ? ldp : 0), *p2 = p0 + (nr > 2 ? 2 * ldp : 0),
                    *p3 = p0 + (nr > 3 ? 3 * ldp : 0);
        float *o0 = o + (size_t)r0 * hd, *o1 = o0 + (nr > 1 ? hd : 0), *o2 = o0 + (nr > 2 ? 2 * hd : 0),
              *o3 = o0 + (nr > 3 ? 3 * hd : 0);
        for (int c = 0; c < h16; c += 16) {
            __m256 a0 = _mm256_loadu_ps(o0 + c), a1 = _mm256_loadu_ps(o0 + c + 8);
            __m256 b0 = _mm256_loadu_ps(o1 + c), b1 = _mm256_loadu_ps(o1 + c + 8);
            __m256 c0 = _mm256_loadu_ps(o2 + c), c1 = _mm256_loadu_ps(o2 + c + 8);
            __m256 d0 = _mm256_loadu_ps(o3 + c), d1 = _mm256_loadu_ps(o3 + c + 8);
            for (int j = 0; j < n; j++) {
                const float *vj = v + (size_t)j * hd + c;
                __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8), w;
#define PV_ROW(pr, lo, hi) (w = _mm256_broadcast_ss(pr + j), lo = _mm256_fmadd_ps(w, v0, lo), hi = _mm256_fmadd_ps(w, v1, hi))
                PV_ROW(p0, a0, a1);
                PV_ROW(p1, b0, b1);
                PV_ROW(p2, c0, c1);
                PV_ROW(p3, d0, d1);
#undef PV_ROW
            }
            _mm256_storeu_ps(o3 + c, d0), _mm256_storeu_ps(o3 + c + 8, d1);
            _mm256_storeu_ps(o2 + c, c0), _mm256_storeu_ps(o2 + c + 8, c1);
            _mm256_storeu_ps(o1 + c, b0), _mm256_storeu_ps(o1 + c + 8, b1);
            _mm256_storeu_ps(o0 + c, a0), _mm256_storeu_ps(o0 + c + 8, a1);
        }
        for (int r = 0; r < nr; r++)
            for (int c = h16; c < hd; c++) {
                float t = o[(size_t)(r0 + r) * hd + c];
                for (int j = 0; j < n; j++) t += p[(size_t)(r0 + r) * ldp + j] * v[(size_t)j * hd + c];
                o[(size_t)(r0 + r) * hd + c] = t;
            }
    }
}
#endif

static void pick_attn(int path, expsum_fn *expsum, pv_fn *pv) {
    *expsum = expsum_scalar;
    *pv = pv_scalar;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path)) { /* AVX-512 CPUs have AVX2 */
        *expsum = expsum_avx2;
        *pv = pv_avx2;
    }
#endif
}

/* g = act(g) * u. relu2 clears negative inputs with their sign bit, so the loop has no branch (the
 * compilers leave a float compare-and-select as a branch, mispredicted on half the elements) */
I2V_VEC static void gate_act(float *restrict g, const float *restrict u, size_t n, int act) {
    if (act == 0) {
        for (size_t i = 0; i < n; i++) {
            int32_t b;
            memcpy(&b, g + i, 4);
            b &= ~(b >> 31);
            float a;
            memcpy(&a, &b, 4);
            g[i] = a * a * u[i];
        }
    } else {
        for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

I2V_VEC static float dot_bf16(const uint16_t *a, const float *b, int n) {
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
/* projections of one quantized input in one pool run, each dequantized with its weight scale by the
 * part that made its sums: y_i = acc_i * (scale_i / s), float32 as the reference */
static int project(const bn_model *m, int n, const bn_linear *const *ps, const int8_t *q, size_t ldq,
                   const float *s, const int32_t *qsum, int T, float *const *ys, const size_t *ldys) {
    const uint8_t *w[I2V_MAX_MATS];
    int N[I2V_MAX_MATS];
    float scale[I2V_MAX_MATS];
    for (int i = 0; i < n; i++) {
        w[i] = ps[i]->w;
        N[i] = ps[i]->N;
        scale[i] = ps[i]->scale;
    }
    return i2v_gemm_multi_f32(q, ldq, qsum, s, T, ps[0]->K, n, w, N, scale, ys, ldys, m->path);
}

static int project1(const bn_model *m, const bn_linear *p, const int8_t *q, size_t ldq, const float *s,
                    const int32_t *qsum, int T, float *y, size_t ldy) {
    return project(m, 1, &p, q, ldq, s, qsum, T, &y, &ldy);
}

/* RMSNorm then per-token int8 quantization of T rows (in [T, ldin] -> xn [T, n] -> q [T, ldq]),
 * rows split over the pool when there are several. Before its norm a row can take the step that
 * made it, done here while the row is in cache and over the pool: NQ_ADD the residual (in += pre),
 * NQ_GATE the feed-forward's activation (in = act(in) * pre); pre has in's row stride. */
enum { NQ_PLAIN, NQ_ADD, NQ_GATE };

typedef struct {
    const bn_model *m;
    float *in;
    const float *pre, *w;
    int pre_kind;
    size_t ldin, ldq;
    int n, T;
    float *xn, *s;
    int8_t *q;
    int32_t *qsum;
    int rc[NQ_MAX_PARTS];
} nq_task;

static void nq_part(void *ctx, int part, int np) {
    nq_task *a = (nq_task *)ctx;
    int t0 = (int)((long)a->T * part / np), t1 = (int)((long)a->T * (part + 1) / np);
    for (int t = t0; t < t1; t++) {
        float *row = a->in + (size_t)t * a->ldin;
        if (a->pre_kind == NQ_ADD) {
            axpy(row, 1.0f, a->pre + (size_t)t * a->ldin, a->n);  /* row += pre: 1 * pre is exact */
        } else if (a->pre_kind == NQ_GATE) {
            gate_act(row, a->pre + (size_t)t * a->ldin, (size_t)a->n, a->m->act);
        }
        rmsnorm(a->m->dot, row, a->w, a->xn + (size_t)t * a->n, a->n, a->m->eps);
    }
    a->rc[part] = t1 > t0 ? i2v_quantize(a->xn + (size_t)t0 * a->n, (size_t)a->n, t1 - t0, a->n,
                                         a->q + (size_t)t0 * a->ldq, a->ldq, a->s + t0, a->qsum + t0, a->m->path)
                          : 0;
}

/* the parts of a pool run over T rows: one below 8 rows, else two a thread (NQ_MAX_PARTS at most) */
static int row_parts(int T) {
    int parts = T < 8 ? 1 : 2 * i2v_pool_threads();
    if (parts > NQ_MAX_PARTS) parts = NQ_MAX_PARTS;
    return parts > T ? T : parts;
}

static int norm_quant(const bn_model *m, float *in, size_t ldin, const float *pre, int pre_kind, const float *w,
                      int n, int T, float *xn, int8_t *q, size_t ldq, float *s, int32_t *qsum) {
    nq_task a = {m, in, pre, w, pre ? pre_kind : NQ_PLAIN, ldin, ldq, n, T, xn, s, q, qsum, {0}};
    int parts = row_parts(T);
    if (parts <= 1) {
        nq_part(&a, 0, 1);
        return a.rc[0];
    }
    i2v_pool_run(nq_part, &a, parts);
    for (int p = 0; p < parts; p++)
        if (a.rc[p]) return a.rc[p];
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

/* RoPE on the q and k heads of rows t0 .. t1 of qkv [T, q | k | v], and k, v into the cache at
 * positions pos + t */
typedef struct {
    const bn_model *m;
    const bn_layer *y;
    float *qkv;
    int T, pos;
} rope_task;

static void rope_part(void *ctx, int part, int np) {
    const rope_task *a = (const rope_task *)ctx;
    const bn_model *m = a->m;
    int hd = m->hd, qn = m->nh * hd, kvn = m->nkv * hd;
    size_t ldqkv = (size_t)(qn + 2 * kvn);
    int t0 = (int)((long)a->T * part / np), t1 = (int)((long)a->T * (part + 1) / np);
    for (int t = t0; t < t1; t++) {
        int ps = a->pos + t;
        float *qt = a->qkv + (size_t)t * ldqkv, *kt = qt + qn, *vt = kt + kvn;
        const float *c = m->cos + (size_t)ps * hd, *sn = m->sin + (size_t)ps * hd;
        for (int h = 0; h < m->nh; h++) rope(qt + (size_t)h * hd, c, sn, hd);
        for (int h = 0; h < m->nkv; h++) {
            rope(kt + (size_t)h * hd, c, sn, hd);
            size_t off = ((size_t)h * m->max_len + ps) * hd;
            if (m->kv_f16) {
                m->f2h(kt + (size_t)h * hd, (uint16_t *)a->y->kc + off, hd);
                m->f2h(vt + (size_t)h * hd, (uint16_t *)a->y->vc + off, hd);
            } else {
                memcpy((float *)a->y->kc + off, kt + (size_t)h * hd, sizeof(float) * hd);
                memcpy((float *)a->y->vc + off, vt + (size_t)h * hd, sizeof(float) * hd);
            }
        }
    }
}

/* ---- attention: one part = a range of (kv head, token) pairs ---------------------------------
 * The q heads that share a kv head (grouped-query attention) are done together, over the keys in
 * blocks of ATT_BLK with an online softmax (a running maximum and sum per q row; the output rows are
 * rescaled when the maximum grows). A block of keys and values is converted from f16 once per part
 * and used by all of the part's tokens, so scratch is a block per part whatever the context length. */
#define ATT_BLK 64

typedef struct {
    const bn_model *m;
    const bn_layer *y;
    const float *q; /* [T, ldq]: the q heads first in each row */
    size_t ldq;
    float *out;     /* [T, nh*hd], accumulated in place */
    float *stat;    /* [T, nh, 2]: running maximum and sum */
    float *work;    /* [nparts, group * ATT_BLK + (f16 cache ? 2 * ATT_BLK * hd : 0)] */
    size_t ldwork;
    int T, pos;
} attn_task;

/* tokens ta .. tb (exclusive) of kv head kvh */
static void attend_span(const attn_task *a, int kvh, int ta, int tb, float *work) {
    const bn_model *m = a->m;
    int group = m->nh / m->nkv, hd = m->hd, qn = m->nh * hd;
    float scale = 1.0f / sqrtf((float)hd);
    float *sc = work, *kb = work + (size_t)group * ATT_BLK, *vb = kb + (size_t)ATT_BLK * hd;
    size_t base = (size_t)kvh * m->max_len * hd;
    for (int t = ta; t < tb; t++) {
        memset(a->out + (size_t)t * qn + (size_t)kvh * group * hd, 0, sizeof(float) * group * hd);
        for (int r = 0; r < group; r++) {
            a->stat[((size_t)t * m->nh + kvh * group + r) * 2] = -INFINITY;
            a->stat[((size_t)t * m->nh + kvh * group + r) * 2 + 1] = 0.0f;
        }
    }
    int n_all = a->pos + tb; /* keys the last token sees */
    for (int j0 = 0; j0 < n_all; j0 += ATT_BLK) {
        int nb = n_all - j0 < ATT_BLK ? n_all - j0 : ATT_BLK;
        const float *K, *V;
        if (m->kv_f16) {
            m->h2f((const uint16_t *)a->y->kc + base + (size_t)j0 * hd, kb, nb * hd);
            m->h2f((const uint16_t *)a->y->vc + base + (size_t)j0 * hd, vb, nb * hd);
            K = kb;
            V = vb;
        } else {
            K = (const float *)a->y->kc + base + (size_t)j0 * hd;
            V = (const float *)a->y->vc + base + (size_t)j0 * hd;
        }
        for (int t = ta; t < tb; t++) {
            int n = a->pos + t + 1 - j0; /* keys 0 .. pos + t, of which this block holds n */
            if (n <= 0) continue;
            if (n > nb) n = nb;
            size_t off = (size_t)kvh * group * hd; /* the group's q rows */
            const float *q = a->q + (size_t)t * a->ldq + off;
            float *o = a->out + (size_t)t * qn + off, *st = a->stat + ((size_t)t * m->nh + kvh * group) * 2;
            for (int j = 0; j < n; j++) m->dots(q, group, hd, K + (size_t)j * hd, scale, sc + j, ATT_BLK);
            for (int r = 0; r < group; r++) {
                float *sr = sc + (size_t)r * ATT_BLK, mx = st[2 * r];
                for (int j = 0; j < n; j++) mx = sr[j] > mx ? sr[j] : mx;
                float sum = m->expsum(sr, n, mx);
                if (mx > st[2 * r]) { /* the maximum grew: rescale what is summed so far */
                    float d = st[2 * r] - mx, c = d < -104.0f ? 0.0f : expf(d);
                    st[2 * r + 1] *= c;
                    for (int i = 0; i < hd; i++) o[(size_t)r * hd + i] *= c;
                    st[2 * r] = mx;
                }
                st[2 * r + 1] += sum;
            }
            m->pv(o, group, hd, sc, ATT_BLK, V, n);
        }
    }
    for (int t = ta; t < tb; t++)
        for (int r = 0; r < group; r++) {
            float inv = 1.0f / a->stat[((size_t)t * m->nh + kvh * group + r) * 2 + 1];
            float *o = a->out + (size_t)t * qn + (size_t)(kvh * group + r) * hd;
            for (int i = 0; i < hd; i++) o[i] *= inv;
        }
}

static void attn_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    long T = a->T, total = T * a->m->nkv, i0 = total * part / np, i1 = total * (part + 1) / np;
    while (i0 < i1) { /* (kv head, token) pairs are kv-head-major: split at kv head boundaries */
        long kvh = i0 / T, end = (kvh + 1) * T < i1 ? (kvh + 1) * T : i1;
        attend_span(a, (int)kvh, (int)(i0 - kvh * T), (int)(end - kvh * T), a->work + (size_t)part * a->ldwork);
        i0 = end;
    }
}

/* ---- the head: logits[t, v] = h[t] . E[v] ---------------------------------------------------- */
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

/* AVX2 has no vpdpbusd, and u * e in vpmaddubsw would saturate: multiply |x| (unsigned) by e
 * carrying x's sign, at most 2 * 127 * 127 per pair (|x|, |e| <= 127). Sums are the signed x . e, so
 * no row-sum correction. x and |x| come made once per token by the caller. The rows in four quarters,
 * row i of each side by side: four streams from memory, which this core reads faster than one. */
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
        if (i2v_path_has_avx512vnni(path)) {  /* AMX too: it implies VNNI */
            head_q8_vnni(a, v0, v1);
            return;
        }
        if (path == I2V_PATH_AVX2) {
            head_q8_avx2(a, v0, v1);
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
    int group = m->nh / m->nkv;
    int attn_parts = T * m->nkv < 4 * threads ? T * m->nkv : 4 * threads;
    /* scratch, one allocation */
    size_t ld6 = (size_t)((H + 63) / 64) * 64; /* the 6-bit head's activation rows */
    size_t n_x = (size_t)T * H, n_xn = (size_t)T * (wide > qn + 2 * kvn ? wide : qn + 2 * kvn), n_q8 = (size_t)T * (kp > ld6 ? kp : ld6);
    size_t n_att = (size_t)T * (qn > H ? qn : H), n_g = (size_t)T * I;
    size_t ldwork = (size_t)group * ATT_BLK + (m->kv_f16 ? 2 * (size_t)ATT_BLK * hd : 0);
    size_t n_work = (size_t)attn_parts * ldwork, n_stat = (size_t)T * m->nh * 2;
    int head_path = m->path < 0 ? i2v_best_path() : m->path;
    size_t n_ax = m->head_kind == BN_Q8 && head_path == I2V_PATH_AVX2 ? (size_t)n_out * kpad(H) : 0;
    size_t bytes = 4 * (n_x + n_xn + n_att + n_g + 2 * (size_t)T + n_work + n_stat) + n_q8 + n_ax +
                   64 * 11;
    char *buf = scratch_for((bn_model *)m, bytes);
    if (!buf) return -2;
    char *p = buf;
#define TAKE(T_, n_) ((T_ *)(p = (char *)(((uintptr_t)(p) + 63) & ~(uintptr_t)63), p += (n_) * sizeof(T_), p - (n_) * sizeof(T_)))
    /* xn holds each norm's output only until it is quantized into q8; then it takes q|k|v (attention
     * reads q from it in place) and the up projection */
    float *x = TAKE(float, n_x), *xn = TAKE(float, n_xn), *att = TAKE(float, n_att);
    float *g = TAKE(float, n_g), *s = TAKE(float, T), *qkv = xn, *u = xn;
    float *work = TAKE(float, n_work), *stat = TAKE(float, n_stat);
    int32_t *qsum = TAKE(int32_t, T);
    int8_t *q8 = TAKE(int8_t, n_q8), *ax = n_ax ? TAKE(int8_t, n_ax) : NULL;
#undef TAKE
    int rc = 0;
    int64_t tlap = m->profiling ? now_ns() : 0;
    /* embedding: rows from the mapping, or read with pread (bf16 rows by way of xn, unused yet) */
    for (int t = 0; t < T && !rc; t++) {
        float *xt = x + (size_t)t * H;
        size_t row = (size_t)tokens[t] * H;
        if (m->embed_fd >= 0) {
            size_t n = (m->embed_kind == BN_F32 ? 4 : 2) * (size_t)H, got = 0;
            char *dst = m->embed_kind == BN_F32 ? (char *)xt : (char *)xn;
            while (got < n) {
                ssize_t r = pread(m->embed_fd, dst + got, n - got, (off_t)(m->embed_offset + row * (n / H) + got));
                if (r <= 0) break;
                got += (size_t)r;
            }
            if (got < n) rc = -3;
            else if (m->embed_kind == BN_BF16)
                for (int i = 0; i < H; i++) xt[i] = bf16_to_f32(((const uint16_t *)dst)[i]);
        } else if (m->embed_kind == BN_F32)
            memcpy(xt, (const float *)m->embed + row, sizeof(float) * H);
        else
            for (int i = 0; i < H; i++) xt[i] = bf16_to_f32(((const uint16_t *)m->embed)[row + i]);
    }
    size_t ldqkv = (size_t)(qn + 2 * kvn);
    LAP(BN_PROF_EMBED);
    const float *pending = NULL;  /* the last down projection's output, not yet added into x */
    for (int l = 0; l < m->L && !rc; l++) {
        const bn_layer *y = &m->layers[l];
        /* attention */
        if ((rc = norm_quant(m, x, (size_t)H, pending, NQ_ADD, y->attn_norm, H, T, xn, q8, kpad(H), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        {
            const bn_linear *ps[3] = {&y->proj[P_Q], &y->proj[P_K], &y->proj[P_V]};
            float *ys[3] = {qkv, qkv + qn, qkv + qn + kvn};
            size_t ld[3] = {ldqkv, ldqkv, ldqkv};
            if ((rc = project(m, 3, ps, q8, kpad(H), s, qsum, T, ys, ld))) break;
        }
        LAP(BN_PROF_QKV);
        rope_task rt = {m, y, qkv, T, pos};
        i2v_pool_run(rope_part, &rt, row_parts(T));
        LAP(BN_PROF_ROPE_KV);
        attn_task at = {m, y, qkv, ldqkv, att, stat, work, ldwork, T, pos};
        i2v_pool_run(attn_part, &at, attn_parts);
        LAP(BN_PROF_ATTN);
        if ((rc = norm_quant(m, att, (size_t)qn, NULL, NQ_PLAIN, y->attn_sub_norm, qn, T, xn, q8, kpad(qn), s, qsum)))
            break;
        LAP(BN_PROF_NORM_QUANT);
        if ((rc = project1(m, &y->proj[P_O], q8, kpad(qn), s, qsum, T, att, (size_t)H))) break;
        LAP(BN_PROF_O);
        /* feed-forward: the residual x += o-projection first */
        if ((rc = norm_quant(m, x, (size_t)H, att, NQ_ADD, y->ffn_norm, H, T, xn, q8, kpad(H), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        {
            const bn_linear *ps[2] = {&y->proj[P_GATE], &y->proj[P_UP]};
            float *ys[2] = {g, u};
            size_t ld[2] = {(size_t)I, (size_t)I};
            if ((rc = project(m, 2, ps, q8, kpad(H), s, qsum, T, ys, ld))) break;
        }
        LAP(BN_PROF_GATE_UP);
        /* u is xn: row t of the norm's output overwrites row t of u, just read for that row's gate
         * (same stride I), so no part writes a row another part still reads */
        if ((rc = norm_quant(m, g, (size_t)I, u, NQ_GATE, y->ffn_sub_norm, I, T, xn, q8, kpad(I), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        if ((rc = project1(m, &y->proj[P_DOWN], q8, kpad(I), s, qsum, T, att, (size_t)H))) break;
        LAP(BN_PROF_DOWN);
        pending = att;
    }
    if (!rc && pending) {
        for (size_t i = 0; i < n_x; i++) x[i] += pending[i];
        LAP(BN_PROF_NORM_QUANT);
    }
    if (!rc && hidden_out)
        for (int t = 0; t < T; t++) rmsnorm(m->dot, x + (size_t)t * H, m->final_norm, hidden_out + (size_t)t * H, H, m->eps);
    if (!rc && logits && n_out > 0) {
        int t0 = T - n_out;
        for (int t = 0; t < n_out; t++) rmsnorm(m->dot, x + (size_t)(t0 + t) * H, m->final_norm, xn + (size_t)t * H, H, m->eps);
        head_task ht = {m, xn, NULL, NULL, NULL, NULL, 0, logits, n_out};
        if (m->head_kind == BN_Q6) {
            /* 6-bit rows (formats/q6.py) times per-token int8 activations, exact int32, then
             * logits = acc * row_scale / s (the int32 sums are written into the logits themselves,
             * then converted in place) */
            int32_t *acc6 = (int32_t *)(void *)logits;
            if (!(rc = i2v_quantize(xn, (size_t)H, n_out, H, q8, ld6, s, qsum, m->path)) &&
                !(rc = i2v_q6_gemv((const uint8_t *)m->head, m->V, H, q8, ld6, qsum, n_out, acc6, (size_t)m->V, m->path))) {
                for (int t = 0; t < n_out; t++) {
                    float inv = 1.0f / s[t], *lg = logits + (size_t)t * m->V;
                    for (int v = 0; v < m->V; v++) {
                        int32_t a;
                        memcpy(&a, lg + v, 4);
                        lg[v] = (float)a * (m->head_scale[v] * inv);
                    }
                }
            }
            LAP(BN_PROF_HEAD);
            return rc;
        }
        if (m->head_kind == BN_Q8) {
            /* per-token int8 activations: with |x| beside them for AVX2, else shifted to unsigned for
             * vpdpbusd (the shift is undone with the precomputed row sums) */
            size_t ldu = kpad(H);
            if ((rc = i2v_quantize(xn, (size_t)H, n_out, H, q8, ldu, s, qsum, m->path)) == 0) {
                if (ax) {
                    for (size_t i = 0; i < n_ax; i++) ax[i] = (int8_t)(q8[i] < 0 ? -q8[i] : q8[i]);
                    ht.x = q8;
                    ht.ax = ax;
                } else {
                    for (size_t i = 0; i < (size_t)n_out * ldu; i++) ((uint8_t *)q8)[i] = (uint8_t)(q8[i] + 128);
                    ht.u = (const uint8_t *)q8;
                }
                ht.s = s;
                ht.ldu = ldu;
            }
        }
        if (!rc) i2v_pool_run(head_part, &ht, 4 * threads);
        LAP(BN_PROF_HEAD);
    }
    return rc;
}

int bn_forward(const bn_model *m, const int32_t *tokens, int T, int pos, float *logits, int n_out) {
    return forward(m, tokens, T, pos, NULL, logits, n_out);
}

int bn_forward_hidden(const bn_model *m, const int32_t *tokens, int T, int pos, float *hidden) {
    return forward(m, tokens, T, pos, hidden, NULL, 0);
}
