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

dot_fn bn_pick_dot(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) return dot_avx512;
    if (path == I2V_PATH_AVX2) return dot_avx2;
#endif
    (void)path;
    return dot_scalar;
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

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* r = x - n ln 2 (ln 2 in two parts) and y = exp(r) by Cephes' polynomial, on registers of prefix P
 * (_mm256 or _mm512): one list of steps and constants, so both widths give each element the same bits */
#define EXP_POLY(P, x, n, r, y)                                                        \
    do {                                                                               \
        r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x);                            \
        r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                         \
        y = P##_set1_ps(1.9875691500e-4f);                                             \
        y = P##_fmadd_ps(y, r, P##_set1_ps(1.3981999507e-3f));                         \
        y = P##_fmadd_ps(y, r, P##_set1_ps(8.3334519073e-3f));                         \
        y = P##_fmadd_ps(y, r, P##_set1_ps(4.1665795894e-2f));                         \
        y = P##_fmadd_ps(y, r, P##_set1_ps(1.6666665459e-1f));                         \
        y = P##_fmadd_ps(y, r, P##_set1_ps(5.0000001201e-1f));                         \
        y = P##_fmadd_ps(y, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.0f)));       \
    } while (0)

/* exp(x) for x <= 0: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, then
 * 2^n into the exponent): within 1 ulp of the correctly rounded exp on every 64th float of (-87.3, 0]
 * (a throwaway check against double exp); 0 below -87.3 where the result would be subnormal */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpos_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r, y;
    EXP_POLY(_mm256, x, n, r, y);
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

/* exp_nonpos_avx2 on 16 lanes: the same steps (EXP_POLY), so each element the same bits */
__attribute__((target("avx512f"))) static inline __m512 exp_nonpos_avx512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r, y;
    EXP_POLY(_mm512, x, n, r, y);
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(e));
}

/* 16 lanes a step, the last step masked (no scalar tail: every element by the polynomial). Half the
 * AVX2 loop's instructions; it was 6% of attention's samples at 4,000 positions (benchmarks/README.md) */
__attribute__((target("avx512f"))) static float expsum_avx512(float *s, int n, float mx) {
    __m512 m16 = _mm512_set1_ps(mx), acc = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        __mmask16 k = (__mmask16)(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1);
        __m512 e = exp_nonpos_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m16));
        _mm512_mask_storeu_ps(s + j, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

/* the largest of s[0 .. n) (n >= 1). A maximum is exact, so any order gives the same bits: the scalar loop
 * is one dependent chain (4 cycles a key), the AVX2 one 4 x 8 lanes */
static float rowmax_scalar(const float *s, int n) {
    float mx = s[0];
    for (int j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
__attribute__((target("avx2"))) static float rowmax_avx2(const float *s, int n) {
    if (n < 32) return rowmax_scalar(s, n);
    __m256 a = _mm256_loadu_ps(s), b = _mm256_loadu_ps(s + 8), c = _mm256_loadu_ps(s + 16), d = _mm256_loadu_ps(s + 24);
    int j = 32;
    for (; j + 32 <= n; j += 32) {
        a = _mm256_max_ps(a, _mm256_loadu_ps(s + j));
        b = _mm256_max_ps(b, _mm256_loadu_ps(s + j + 8));
        c = _mm256_max_ps(c, _mm256_loadu_ps(s + j + 16));
        d = _mm256_max_ps(d, _mm256_loadu_ps(s + j + 24));
    }
    a = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
    float t[8], mx;
    _mm256_storeu_ps(t, a);
    mx = rowmax_scalar(t, 8);
    return j < n ? (mx > rowmax_scalar(s + j, n - j) ? mx : rowmax_scalar(s + j, n - j)) : mx;
}
#endif

rowmax_fn bn_pick_rowmax(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path)) return rowmax_avx2;
#endif
    (void)path;
    return rowmax_scalar;
}

expsum_fn bn_pick_expsum(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) return expsum_avx512;
    if (path == I2V_PATH_AVX2) return expsum_avx2;
#endif
    (void)path;
    return expsum_scalar;
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
