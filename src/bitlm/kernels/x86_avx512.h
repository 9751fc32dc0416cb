/* The AVX-512 intrinsics of avx512vnni.c and avx512vbmi.c, from one of two places:
 *
 *   default      <immintrin.h>, each function compiled for its instruction set by a target attribute
 *                (the production build, setup.py);
 *   -DI2V_SIMDE  SIMDe's portable implementations of the same intrinsics (Debian: libsimde-dev), no
 *                target attribute: the kernels' own code runs on any x86-64 CPU, AVX-512 or not,
 *                slowly. tests/kernels/test_c_harness.py builds the exactness harness this way, so CI
 *                checks these kernels against the scalar reference whatever CPU it gets.
 *
 * SIMDe 0.7.4 (Debian 12) lacks a few of the intrinsics used here; each is written below, lane by
 * lane with its documented semantics, only where SIMDe does not define it (newer SIMDe versions do). */
#ifndef BITLM_X86_AVX512_H
#define BITLM_X86_AVX512_H

#ifndef I2V_SIMDE

#include <immintrin.h>
#define I2V_TARGET(isa) __attribute__((target(isa)))

#else

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <math.h>
#include <simde/x86/avx512.h>
#include <stdint.h>
#include <string.h>

#define I2V_TARGET(isa)
/* the mask types by their native names (C11 allows a typedef to be repeated with the same type) */
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;

#define I2V_EMU static inline __attribute__((unused))

#ifndef _mm512_srai_epi32
#define _mm512_srai_epi32(a, imm) i2v_emu_srai_epi32((a), (imm))
I2V_EMU __m512i i2v_emu_srai_epi32(__m512i a, unsigned imm) {
    int32_t v[16];
    _mm512_storeu_si512((void *)v, a);
    for (int i = 0; i < 16; i++) v[i] >>= imm > 31 ? 31 : imm;  /* GCC: >> of a negative int is arithmetic */
    return _mm512_loadu_si512((const void *)v);
}
#endif

#ifndef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32(a) i2v_emu_cvtps_epi32(a)
/* rounding in the current mode, as vcvtps2dq with MXCSR; out of range: the integer indefinite 0x80000000 */
I2V_EMU __m512i i2v_emu_cvtps_epi32(__m512 a) {
    float f[16];
    int32_t v[16];
    _mm512_storeu_ps(f, a);
    for (int i = 0; i < 16; i++)
        v[i] = f[i] >= -2147483648.0f && f[i] < 2147483648.0f ? (int32_t)nearbyintf(f[i]) : INT32_MIN;
    return _mm512_loadu_si512((const void *)v);
}
#endif

/* masked loads and stores touch only the lanes whose mask bit is set (a tail never reads past its row) */
#ifndef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) i2v_emu_maskz_loadu_ps((k), (p))
I2V_EMU __m512 i2v_emu_maskz_loadu_ps(__mmask16 k, const void *p) {
    float f[16] = {0};
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy(f + i, (const char *)p + 4 * i, 4);
    return _mm512_loadu_ps(f);
}
#endif

#ifndef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(k, p) i2v_emu_maskz_loadu_epi8((k), (p))
I2V_EMU __m512i i2v_emu_maskz_loadu_epi8(__mmask64 k, const void *p) {
    int8_t b[64] = {0};
    for (int i = 0; i < 64; i++)
        if (k >> i & 1) b[i] = ((const int8_t *)p)[i];
    return _mm512_loadu_si512((const void *)b);
}
#endif

#ifndef _mm512_mask_storeu_epi32
#define _mm512_mask_storeu_epi32(p, k, a) i2v_emu_mask_storeu_epi32((p), (k), (a))
I2V_EMU void i2v_emu_mask_storeu_epi32(void *p, __mmask16 k, __m512i a) {
    int32_t v[16];
    _mm512_storeu_si512((void *)v, a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy((char *)p + 4 * i, v + i, 4);
}
#endif

#ifndef _mm512_mask_cvtsepi32_storeu_epi8
#define _mm512_mask_cvtsepi32_storeu_epi8(p, k, a) i2v_emu_mask_cvtsepi32_storeu_epi8((p), (k), (a))
/* int32 lanes saturated to int8 */
I2V_EMU void i2v_emu_mask_cvtsepi32_storeu_epi8(void *p, __mmask16 k, __m512i a) {
    int32_t v[16];
    _mm512_storeu_si512((void *)v, a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((int8_t *)p)[i] = (int8_t)(v[i] < -128 ? -128 : v[i] > 127 ? 127 : v[i]);
}
#endif

#ifndef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32(a) i2v_emu_reduce_add_epi32(a)
I2V_EMU int32_t i2v_emu_reduce_add_epi32(__m512i a) {
    uint32_t v[16], s = 0;  /* wraps as the vector adds do */
    _mm512_storeu_si512((void *)v, a);
    for (int i = 0; i < 16; i++) s += v[i];
    return (int32_t)s;
}
#endif

#ifndef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps(a) i2v_emu_reduce_max_ps(a)
/* a halving tree of vmaxps (x > y ? x : y), as GCC's own _mm512_reduce_max_ps */
I2V_EMU float i2v_emu_reduce_max_ps(__m512 a) {
    float f[16];
    _mm512_storeu_ps(f, a);
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) f[i] = f[i] > f[i + w] ? f[i] : f[i + w];
    return f[0];
}
#endif

#ifndef _mm512_reduce_or_epi64
#define _mm512_reduce_or_epi64(a) i2v_emu_reduce_or_epi64(a)
I2V_EMU int64_t i2v_emu_reduce_or_epi64(__m512i a) {
    uint64_t v[8], s = 0;
    _mm512_storeu_si512((void *)v, a);
    for (int i = 0; i < 8; i++) s |= v[i];
    return (int64_t)s;
}
#endif

#endif /* I2V_SIMDE */
#endif
