/* Ternary x int8 kernels on the I2V packed layout (drawn in src/bitlm/formats/i2v.py).
 *
 * Plain C on raw pointers: no Python, no torch. One instruction set per .c file, compiled with
 * target attributes (never global -m flags), chosen once at run time in dispatch.c.
 *
 * Packed weights: uint8 [Nb, Kb, 64], Nb = ceil(N/16), Kb = ceil(K/16). Block (rb, kb) holds rows
 * 16rb..16rb+15 and columns 16kb..16kb+15; byte 4r+j, bits 2s..2s+1 = code c = w+1 of row 16rb+r,
 * column 16kb+4s+j. Padding codes are 1 (zero weight).
 *
 * Every kernel computes, for the row blocks [rb0, rb1),
 *     y[m, n] = sum_k x[m, k] * c[n, k] - xsum[m]      (= sum_k x[m, k] * w[n, k], exact int32)
 * for m < M and n < N. |y| <= 128 * 2 * K fits int32 for any K below 8 million.
 */
#ifndef BITLM_I2V_H
#define BITLM_I2V_H

#include <stddef.h>
#include <stdint.h>

#define I2V_ROWS 16
#define I2V_COLS 16
#define I2V_BLOCK 64

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
} i2v_gemm_args;

typedef void (*i2v_kernel_fn)(const i2v_gemm_args *a, int rb0, int rb1);

/* Per-token absmax int8 quantizer (REFERENCE.md): s = 127 / max(max|x|, 1e-5),
 * q = clamp(round_half_even(x * s), -128, 127), s computed as torch does (reciprocal(max) * 127), so
 * q and s equal quant.quantize_activations bit for bit; also the row sum of q for the offset trick.
 * x float32 [M, K] (row stride ldx elements) -> q int8 [M, ldq] with q[m, K..ldq) = 0,
 * scale float32 [M] (= s; dequantize by dividing), qsum int32 [M]. */
typedef void (*i2v_quant_fn)(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq,
                             float *scale, int32_t *qsum);

enum { I2V_PATH_SCALAR = 0, I2V_PATH_AVX2 = 1, I2V_PATH_AVX512VNNI = 2, I2V_NPATHS = 3 };

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
uint64_t i2v_read_avx512(const uint8_t *p, size_t n);
#endif

/* ---- thread pool (pool.c): a persistent pool; the caller runs part 0 itself ---- */
typedef void (*i2v_task_fn)(void *ctx, int part, int nparts);
int i2v_pool_set_threads(int n);  /* n <= 0: one per available CPU; returns the count in use */
int i2v_pool_threads(void);
void i2v_pool_run(i2v_task_fn fn, void *ctx, int nparts);  /* fn(ctx, p, nparts) for p < nparts */

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
int i2v_quantize(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq, float *scale,
                 int32_t *qsum, int path);
/* The whole BitLinear inference forward, y float32 [M, N] = (xq @ W^T) * (wscale / s) with xq, s
 * from i2v_quantize: bit for bit what bitlinear.PackedBitLinear computes in float32. */
int i2v_linear(const float *x, size_t ldx, int M, int K, const uint8_t *w, int N, float wscale, float *y,
               size_t ldy, int path);
/* Read n bytes with SIMD loads split over the pool (the bandwidth probe); returns a checksum. */
uint64_t i2v_read_bytes(const uint8_t *p, size_t n);

#endif
