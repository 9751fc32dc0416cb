/* Ternary x int8 kernels on the I2V packed layout (drawn in src/bitlm/formats/i2v.py).
 *
 * Plain C on raw pointers: no Python, no torch. One instruction set per .c file, compiled with
 * target attributes (never global -m flags), chosen once at run time in dispatch.c. The AVX-512
 * files also build on SIMDe's portable intrinsics, for the tests (x86_avx512.h).
 *
 * Packed weights: uint8 [Nb, Kb, 64], Nb = ceil(N/16), Kb = ceil(K/16). Block (rb, kb) holds rows
 * 16rb..16rb+15 and columns 16kb..16kb+15; byte 4r+j, bits 2s..2s+1 = code c = w+1 of row 16rb+r,
 * column 16kb+4s+j. Padding codes are 1 (zero weight).
 *
 * Every kernel computes, for the row blocks [rb0, rb1),
 *     y[m, n] = sum_k x[m, k] * c[n, k] - xsum[m]      (= sum_k x[m, k] * w[n, k], exact int32)
 * for m < M and n < N. |y| <= 128 * 2 * K fits int32 for any K below 8 million.
 *
 * Also here: the per-token activation quantizer, the HF -> I2V converter, the Q6 output-head rows
 * (formats/q6.py), the thread pool and a bandwidth probe.
 */
#ifndef BITLM_I2V_H
#define BITLM_I2V_H

#include <stddef.h>
#include <stdint.h>

#define I2V_ROWS 16
#define I2V_COLS 16
#define I2V_BLOCK 64

/* plain C loops that the compiler vectorises, one clone per instruction set, picked at load time */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define I2V_VEC __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define I2V_VEC
#endif

typedef struct {
    const int8_t *x;      /* [M, 16*Kb] int8 activations, row stride ldx bytes, zero past K   */
    size_t ldx;
    const int32_t *xsum;  /* [M] sum of each activation row (the offset trick)                */
    int M;
    const uint8_t *w;     /* [Nb, Kb, 64] packed codes                                        */
    int Kb;
    int N;                /* real outputs: columns n >= N of the last row block are not stored */
    int32_t *y;           /* [M, N] int32, row stride ldy elements                            */
    size_t ldy;
    const void *coefs;    /* T5 on AVX2 with M = 1: t5_avx2_coefs(x), made once a call; else NULL      */
} i2v_gemm_args;

typedef void (*i2v_kernel_fn)(const i2v_gemm_args *a, int rb0, int rb1);

/* Q6 rows (formats/q6.py: 6-bit codes u = q + 32, 64 columns in 48 bytes, rows of 48 * ceil(H/64)
 * bytes) times int8 activations: out[m, v] = sum_h x[m, h] * q[v, h], exact int32. */
typedef struct {
    const uint8_t *w;     /* [V, 48 * ceil(H/64)] */
    int V, H;
    const int8_t *x;      /* [M, ldx >= 64 * ceil(H/64)] int8, zero past H */
    size_t ldx;
    const int32_t *xsum;  /* [M] */
    int M;
    int32_t *out;         /* [M, ldo >= V] */
    size_t ldo;
    const int16_t *x16;   /* [M, 64 * ceil(H/64)] int16 activations for the AVX2 kernel, made once
                             by i2v_q6_avx2_x16 (x scaled by a power of 2 per column, see avx2.c) */
} i2v_q6_args;

typedef void (*i2v_q6_fn)(const i2v_q6_args *a, int v0, int v1);  /* rows v0 .. v1-1 */
void i2v_q6_scalar(const i2v_q6_args *a, int v0, int v1);

/* x86 paths need the instruction sets of those before them (AMX is only enabled with AVX-512 VNNI,
 * which comes with AVX2); AMX only changes prefill (M >= 16), below that it runs the AVX-512 VNNI
 * kernel, so code of its own that wants VNNI should test i2v_path_has_avx512vnni(path).
 * NEON is the AArch64 path (with the Armv8.2 dot product). */
enum { I2V_PATH_SCALAR = 0, I2V_PATH_AVX2 = 1, I2V_PATH_AVX512VNNI = 2, I2V_PATH_AMX = 3, I2V_PATH_NEON = 4,
       I2V_NPATHS = 5 };

static inline int i2v_path_has_avx512vnni(int path) {
    return path == I2V_PATH_AVX512VNNI || path == I2V_PATH_AMX;
}

/* Per-token absmax int8 quantizers (REFERENCE.md): s = 127 / max(max|x|, 1e-5),
 * q = clamp(round_half_even(x * s), -128, 127), s computed as torch does (reciprocal(max) * 127), so
 * q and s equal quant.quantize_activations bit for bit; also the row sum of q for the offset trick.
 * x float32 [M, K] (row stride ldx elements) -> q int8 [M, ldq] with q[m, K..ldq) = 0,
 * scale float32 [M] (= s; dequantize by dividing), qsum int32 [M]. */
void i2v_gemm_scalar(const i2v_gemm_args *a, int rb0, int rb1);
void i2v_quant_scalar(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                      float *scale, int32_t *qsum);
#if defined(__x86_64__) || defined(__i386__)
void i2v_gemm_avx2(const i2v_gemm_args *a, int rb0, int rb1);
void i2v_quant_avx2(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                    float *scale, int32_t *qsum);
void i2v_gemm_avx512vnni(const i2v_gemm_args *a, int rb0, int rb1);
void i2v_quant_avx512(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                      float *scale, int32_t *qsum);
uint64_t i2v_read_avx2(const uint8_t *p, size_t n);
/* AMX: activations zero-padded to [ceil(M/32)*32, ldx >= 64*ceil(Kb/4)] when M >= i2v_amx_min_m (pad_geometry) */
void i2v_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1);
uint64_t i2v_read_avx512(const uint8_t *p, size_t n);
void i2v_q6_avx512vbmi(const i2v_q6_args *a, int v0, int v1);
void i2v_q6_avx2(const i2v_q6_args *a, int v0, int v1);
void i2v_q6_avx2_x16(const int8_t *x, size_t ldx, int M, size_t hp, int16_t *x16);
#endif

int i2v_amx_init(void);  /* 1 if the CPU has AMX-INT8 and the OS grants the tile state */
#if defined(__aarch64__)
void i2v_gemm_neon(const i2v_gemm_args *a, int rb0, int rb1);
#endif
int i2v_neon_dotprod_supported(void);  /* 0 off AArch64 */

/* ---- T5: the 1.6-bit layout (formats/t5.py) ----
 * Packed weights uint8 [Nb, Kb, 64], Nb = ceil(N/16), Kb = ceil(K/20). Block (rb, kb) holds rows
 * 16rb..16rb+15 and columns 20kb..20kb+19; byte 4r+i holds the codes t_0..t_4 (c = w+1) of row 16rb+r
 * at columns 20kb+4j+i as q = ceil(256 * (81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) / 243); with y_0 = q and
 * y_{j+1} = 3 y_j mod 256, t_j = (3 y_j) >> 8 = (y_j >= 86) + (y_j >= 171). Padding bytes 0x80.
 * The kernels take i2v_gemm_args with Kb counted in 20-column blocks and x readable and zero up to
 * column 20 Kb; they compute the same exact sums as the I2V kernels. */
#define T5_COLS 20
enum { I2V_FMT_I2V = 0, I2V_FMT_T5 = 1, I2V_NFMTS = 2 };
static inline int i2v_fmt_cols(int fmt) { return fmt == I2V_FMT_T5 ? T5_COLS : I2V_COLS; }
/* The fewest activation rows the AMX path runs on AMX tiles; below, its AVX-512 VNNI kernel. I2V: 20, as
 * the VNNI small-M kernel (weights streamed once, prefetched) beat AMX at 16 rows (2.1-2.2 ms against
 * 2.6-2.7 for a 13824 x 2560 GEMM on 2 threads, cold weights) and was even with it at 20 and behind at
 * 24. T5: 16, where AMX was even with the small-M kernel and ahead from 17 rows (pp17 179-190 t/s
 * against 161-164 at the 2B4T shape, 2 threads). */
static inline int i2v_amx_min_m(int fmt) { return fmt == I2V_FMT_T5 ? 16 : 20; }
void t5_gemm_scalar(const i2v_gemm_args *a, int rb0, int rb1);
#if defined(__x86_64__) || defined(__i386__)
void t5_gemm_avx2(const i2v_gemm_args *a, int rb0, int rb1);
/* the decode kernel's activation coefficients (avx2.c), T5_COEFS 32-byte vectors a block, 32-aligned */
#define T5_COEFS 10
size_t t5_avx2_coefs_bytes(int Kb);
void t5_avx2_coefs(const int8_t *x, int Kb, void *out);
void t5_gemm_avx512vnni(const i2v_gemm_args *a, int rb0, int rb1);
/* AMX: activations zero-padded to [ceil(M/32)*32, ldx >= 64 * ceil(20 Kb / 64)] when M >= 16 */
void t5_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1);
#endif
#if defined(__aarch64__)
void t5_gemm_neon(const i2v_gemm_args *a, int rb0, int rb1);
/* the int8 head's rows (neon.c): out[r] = x . e[r] over H columns for r < nr <= 4, exact */
void i2v_q8_rows_neon(const int8_t *x, const int8_t *const e[4], int nr, int H, int32_t out[4]);
void i2v_q6_neon(const i2v_q6_args *a, int v0, int v1); /* Q6 rows, as i2v_q6_scalar */
#endif

/* ---- thread pool (pool.c): a persistent pool; the caller runs part 0 itself ---- */
typedef void (*i2v_task_fn)(void *ctx, int part, int nparts);
int i2v_pool_set_threads(int n);  /* n <= 0: one per available CPU; returns the count in use */
int i2v_pool_threads(void);
void i2v_pool_run(i2v_task_fn fn, void *ctx, int nparts);  /* fn(ctx, p, nparts) for p < nparts */
/* [*lo, *hi): part p's units of `total`, for a task of nparts parts: each thread's share cut into parts
 * of falling size, so that the end of a run waits on short parts (pool.c) */
void i2v_pool_split(long total, int p, int nparts, long *lo, long *hi);

/* ---- dispatch.c: the public entry points used by the binding ---- */
int i2v_best_path(void);
int i2v_path_supported(int path);
const char *i2v_path_name(int path);
const char *i2v_cpu_features(void);  /* space-separated list of the features that matter */
/* y[M, N] = x[M, K] (int8, row stride ldx) times packed W^T; xsum may be NULL (computed here).
 * path < 0: the best supported. Returns 0, or -1 for an unsupported path / bad arguments,
 * -2 when out of memory. */
int i2v_gemm(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, const uint8_t *w,
             int N, int32_t *y, size_t ldy, int path);
/* Several matrices of the same K on one input (q, k, v; gate, up) in one pool run:
 * y[i][M, N[i]] = x times W[i]^T for i < nmat <= I2V_MAX_MATS. */
#define I2V_MAX_MATS 4
int i2v_gemm_multi(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, int nmat,
                   const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy, int path);
/* The same with the sums dequantized by the part that made them: y[i][m, n] float32 =
 * sum * (wscale[i] / s[m]) (s from i2v_quantize), as bitnet.c's project() wants. Each y[i] holds its
 * int32 sums until they are converted in place, so it must not overlap x, xsum or s. */
int i2v_gemm_multi_f32(const int8_t *x, size_t ldx, const int32_t *xsum, const float *s, int M, int K,
                       int nmat, const uint8_t *const *w, const int *N, const float *wscale,
                       float *const *y, const size_t *ldy, int path);
int i2v_quantize(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq, float *scale,
                 int32_t *qsum, int path);
/* The same three for weights in format fmt (I2V_FMT_*: I2V or T5 packed, the packed shapes above).
 * T5 on AMX decodes its blocks into the same B tiles as I2V (amx.c). */
int i2v_gemm_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, const uint8_t *w,
                 int N, int32_t *y, size_t ldy, int path);
int i2v_gemm_multi_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, int nmat,
                       const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy, int path);
int i2v_gemm_multi_f32_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, const float *s, int M,
                           int K, int nmat, const uint8_t *const *w, const int *N, const float *wscale,
                           float *const *y, const size_t *ldy, int path);

/* The whole BitLinear inference forward, y float32 [M, N] = (xq @ W^T) * (wscale / s) with xq, s
 * from i2v_quantize: bit for bit what bitlinear.PackedBitLinear computes in float32. */
int i2v_linear(const float *x, size_t ldx, int M, int K, const uint8_t *w, int N, float wscale, float *y,
               size_t ldy, int path);
/* Hugging Face packed uint8 [ceil(out/4), in] -> I2V packed uint8 [ceil(out/16), ceil(in/16), 64]
 * (convert.c; formats/i2v.py's from_hf_packed is the reference). */
int i2v_from_hf(const uint8_t *hf, int out, int in, uint8_t *dst);
/* ... into weight format fmt (I2V_FMT_*): T5 packed uint8 [ceil(out/16), ceil(in/20), 64] for I2V_FMT_T5
 * (formats/t5.py's from_hf_packed is the reference) */
int i2v_from_hf_fmt(int fmt, const uint8_t *hf, int out, int in, uint8_t *dst);
/* Q6 rows times int8 activations (see i2v_q6_args), rows split over the pool. AVX-512 VBMI when
 * the CPU has it and path is AVX-512 VNNI or AMX (or < 0); else AVX2 on the x86 paths; NEON on the
 * NEON path; else the scalar reference. x must be
 * readable and zero up to 64 * ceil(H/64) columns. xsum may be NULL. */
int i2v_q6_gemv(const uint8_t *w, int V, int H, const int8_t *x, size_t ldx, const int32_t *xsum, int M,
                int32_t *out, size_t ldo, int path);
int i2v_has_avx512vbmi(void);
const char *i2v_q6_kernel_name(int path);  /* the kernel i2v_q6_gemv runs on that path */
i2v_q6_fn i2v_q6_kernel(int path);         /* ... and the kernel itself (AVX2's wants x16); path < 0: best */
/* Read n bytes with SIMD loads split over the pool (the bandwidth probe); returns a checksum. */
uint64_t i2v_read_bytes(const uint8_t *p, size_t n);

#endif
