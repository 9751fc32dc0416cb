/* The float loops of the forward (bitnet_impl.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_impl.h"

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

dots_fn bn_pick_dots(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path)) return dots_avx2;  /* AVX-512 CPUs have AVX2 */
#endif
    (void)path;
    return dots_scalar;
}

dot_fn bn_pick_dot(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) return dot_avx512;
    if (path == I2V_PATH_AVX2) return dot_avx2;
#endif
    (void)path;
    return dot_scalar;
}


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

void bn_pick_cvt(int path, cvt_fn *h2f, cvt_fn *f2h) {
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

I2V_VEC void bn_rmsnorm(dot_fn dot, const float *restrict x, const float *restrict w, float *restrict out,
                        int n, float eps) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

I2V_VEC void bn_axpy(float *y, float a, const float *x, int n) {
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
        for (int r = 0; r < nq; r++) bn_axpy(o + (size_t)r * hd, p[(size_t)r * ldp + j], v + (size_t)j * hd, hd);
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

void bn_pick_attn(int path, expsum_fn *expsum, pv_fn *pv) {
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
I2V_VEC void bn_gate_act(float *restrict g, const float *restrict u, size_t n, int act) {
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

I2V_VEC float bn_dot_bf16(const uint16_t *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        uint32_t u = (uint32_t)a[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        s += f * b[i];
    }
    return s;
}
