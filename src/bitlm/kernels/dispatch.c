/* Run-time choice of the kernel path from the CPU's features, and the drivers that pad the
 * activations, split the row blocks over the thread pool and call the chosen kernel. */
#include <stdlib.h>
#include <string.h>

#include "i2v.h"

static const char *const PATH_NAMES[I2V_NPATHS] = {"scalar", "avx2", "avx512vnni", "amx", "neon"};

typedef struct {
    int have[I2V_NPATHS];
    int vbmi;  /* AVX-512 VBMI (vpermb, vpmultishiftqb) for the Q6 head kernel */
    char features[192];
    int best;
} cpu_info;

static cpu_info detect(void) {
    cpu_info c;
    memset(&c, 0, sizeof c);
    c.have[I2V_PATH_SCALAR] = 1;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    /* __builtin_cpu_supports also checks that the OS saves the ymm/zmm state (XCR0) */
    __builtin_cpu_init();
    static const char *const F[] = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"};
    int on[6] = {
        __builtin_cpu_supports("avx2"), __builtin_cpu_supports("fma"),
        __builtin_cpu_supports("avx512f"), __builtin_cpu_supports("avx512bw"),
        __builtin_cpu_supports("avx512vl"), __builtin_cpu_supports("avx512vnni")};
    for (int i = 0; i < 6; i++) {
        if (!on[i]) continue;
        if (c.features[0]) strcat(c.features, " ");
        strcat(c.features, F[i]);
    }
    c.have[I2V_PATH_AVX2] = on[0] && on[1];
    c.have[I2V_PATH_AVX512VNNI] = c.have[I2V_PATH_AVX2] && on[2] && on[3] && on[4] && on[5];
#ifndef I2V_SIMDE
    c.have[I2V_PATH_AMX] = c.have[I2V_PATH_AVX512VNNI] && i2v_amx_init();
    c.vbmi = c.have[I2V_PATH_AVX512VNNI] && __builtin_cpu_supports("avx512vbmi");
    if (c.vbmi) strcat(c.features, " avx512vbmi");
    if (c.have[I2V_PATH_AMX]) strcat(c.features, " amx-int8");
#else
    /* The AVX-512 kernels built on SIMDe's portable intrinsics (x86_avx512.h; the test harness's
     * second build): they run on any x86-64 CPU, so they are offered whatever CPUID says. AMX has no
     * portable emulation: that path is left out of this build. */
    if (__builtin_cpu_supports("avx512vbmi")) strcat(c.features, " avx512vbmi");
    c.have[I2V_PATH_AVX512VNNI] = 1;
    c.vbmi = 1;
#endif
#elif defined(__aarch64__)
    c.have[I2V_PATH_NEON] = i2v_neon_dotprod_supported();
    strcpy(c.features, c.have[I2V_PATH_NEON] ? "neon dotprod" : "neon");
#endif
    c.best = I2V_PATH_SCALAR;
    for (int p = 0; p < I2V_NPATHS; p++)
        if (c.have[p]) c.best = p;
    const char *env = getenv("BITLM_KERNEL");  /* force a path (tests, benchmarks) */
    if (env)
        for (int p = 0; p < I2V_NPATHS; p++)
            if (strcmp(env, PATH_NAMES[p]) == 0 && c.have[p]) c.best = p;
    return c;
}

static const cpu_info *cpu(void) {
    static cpu_info info;
    static int done = 0;  /* detection is idempotent, so a benign race at most repeats it */
    if (!done) {
        info = detect();
        done = 1;
    }
    return &info;
}

int i2v_best_path(void) { return cpu()->best; }
int i2v_path_supported(int path) { return path >= 0 && path < I2V_NPATHS && cpu()->have[path]; }
const char *i2v_path_name(int path) { return path >= 0 && path < I2V_NPATHS ? PATH_NAMES[path] : "?"; }
const char *i2v_cpu_features(void) { return cpu()->features; }

static i2v_kernel_fn kernel_for(int path, int fmt) {
    if (fmt == I2V_FMT_T5) switch (path) {
#if defined(__x86_64__) || defined(__i386__)
        case I2V_PATH_AMX: return t5_gemm_amx;
        case I2V_PATH_AVX512VNNI: return t5_gemm_avx512vnni;
        case I2V_PATH_AVX2: return t5_gemm_avx2;
#endif
#if defined(__aarch64__)
        case I2V_PATH_NEON: return t5_gemm_neon;
#endif
        default: return t5_gemm_scalar;
        }
    switch (path) {
#if defined(__x86_64__) || defined(__i386__)
    case I2V_PATH_AMX: return i2v_gemm_amx;
    case I2V_PATH_AVX512VNNI: return i2v_gemm_avx512vnni;
    case I2V_PATH_AVX2: return i2v_gemm_avx2;
#endif
#if defined(__aarch64__)
    case I2V_PATH_NEON: return i2v_gemm_neon;
#endif
    default: return i2v_gemm_scalar;
    }
}

/* One pool run over the row blocks of up to I2V_MAX_MATS matrices that share their input (q, k, v;
 * gate, up): one synchronisation instead of one per matrix. Part p of np takes a contiguous range of
 * the matrices' row blocks laid end to end, in units of 4 (the GEMV kernels stream 4 row blocks side
 * by side), so each part streams its own stretch of the weights; the ranges shrink toward the end of
 * each thread's share (i2v_pool_split). */
typedef struct {
    i2v_gemm_args a[I2V_MAX_MATS];
    int first[I2V_MAX_MATS + 1]; /* matrix i owns units first[i] .. first[i+1] */
    int nmat;
    i2v_kernel_fn fn;
    const float *wscale;         /* NULL, or the matrices' weight scales: dequantize in the part */
    const float *s;              /* [M] activation scales, with wscale */
} gemm_task;

/* y[m, n0:n1] (int32 sums, in place) -> float32 acc * (wscale / s[m]), the reference's order */
I2V_VEC static void dequantize_rows(const i2v_gemm_args *a, float wscale, const float *s, int n0, int n1) {
    for (int m = 0; m < a->M; m++) {
        float f = wscale / s[m];
        int32_t *am = a->y + (size_t)m * a->ldy;
        float *ym = (float *)(void *)am;
        for (int n = n0; n < n1; n++) {
            int32_t v;
            memcpy(&v, am + n, 4);
            ym[n] = (float)v * f;
        }
    }
}

static void gemm_part(void *ctx, int p, int np) {
    const gemm_task *t = (const gemm_task *)ctx;
    long lo, hi;
    i2v_pool_split(t->first[t->nmat], p, np, &lo, &hi);
    int u0 = (int)lo, u1 = (int)hi;
    for (int i = 0; i < t->nmat; i++) {
        int a = u0 > t->first[i] ? u0 : t->first[i], b = u1 < t->first[i + 1] ? u1 : t->first[i + 1];
        if (a >= b) continue;
        int Nb = (t->a[i].N + I2V_ROWS - 1) / I2V_ROWS;
        int rb0 = 4 * (a - t->first[i]), rb1 = 4 * (b - t->first[i]);
        if (rb1 > Nb) rb1 = Nb;
        if (rb0 >= rb1) continue;
        t->fn(&t->a[i], rb0, rb1);
        if (t->wscale) {
            int n1 = rb1 * I2V_ROWS < t->a[i].N ? rb1 * I2V_ROWS : t->a[i].N;
            dequantize_rows(&t->a[i], t->wscale[i], t->s, rb0 * I2V_ROWS, n1);
        }
    }
}

/* below this many 64-byte blocks of work (M x Nb x Kb) per part, splitting costs more than it saves;
 * up to PARTS_PER_THREAD parts per thread (GEMM_PARTS_PER_THREAD when M > 1) let a thread that was
 * descheduled be covered by the others, and shorten the wait at the end of a run for the last part
 * (at 4 and 4 that wait was 5.5% of a 2-thread prefill's samples and 7% of a decode's; at 16 and 8,
 * 3.7% and 5.5%) */
#define MIN_BLOCKS_PER_PART 256
#define PARTS_PER_THREAD 8
#define GEMM_PARTS_PER_THREAD 16

/* The activations a path reads: whole blocks of the format (16 columns for I2V, 20 for T5); AMX (from
 * i2v_amx_min_m rows) whole tiles of 32 rows and 64 columns past those. Padding is zeros, so it adds
 * nothing. */
static void pad_geometry(int path, int fmt, int M, int K, int *mp, size_t *kp) {
    int amx = path == I2V_PATH_AMX && M >= i2v_amx_min_m(fmt);
    int cols = i2v_fmt_cols(fmt);
    *mp = amx ? (M + 31) / 32 * 32 : M;
    *kp = (size_t)(K + cols - 1) / cols * cols;
    if (amx) *kp = (*kp + 63) / 64 * 64;
}

/* x already zero-padded as pad_geometry says (ldx >= 16 * Kb), xsum given */
static void gemm_padded(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int Kb, int nmat,
                        const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy,
                        const float *wscale, const float *s, int path, int fmt) {
    gemm_task t;
    t.nmat = nmat;
    t.fn = kernel_for(path, fmt);
    t.wscale = wscale;
    t.s = s;
    t.first[0] = 0;
    void *coefs = NULL;  /* T5 decode on AVX2: the activations' coefficient vectors, made once for every part */
#if defined(__x86_64__) || defined(__i386__)
    if (path == I2V_PATH_AVX2 && fmt == I2V_FMT_T5 && M == 1 && (coefs = aligned_alloc(32, t5_avx2_coefs_bytes(Kb))))
        t5_avx2_coefs(x, Kb, coefs);
#endif
    long blocks = 0;
    for (int i = 0; i < nmat; i++) {
        int Nb = (N[i] + I2V_ROWS - 1) / I2V_ROWS;
        i2v_gemm_args a = {x, ldx, xsum, M, w[i], Kb, N[i], y[i], ldy[i], coefs};
        t.a[i] = a;
        t.first[i + 1] = t.first[i] + (Nb + 3) / 4;
        blocks += (long)M * Nb * Kb;
    }
    int parts = (int)(blocks / MIN_BLOCKS_PER_PART);
    int threads = i2v_pool_threads();
    int per_thread = M > 1 ? GEMM_PARTS_PER_THREAD : PARTS_PER_THREAD;
    if (parts > per_thread * threads) parts = per_thread * threads;
    if (parts > t.first[nmat]) parts = t.first[nmat];
    if (threads == 1 || parts < 1) parts = 1;
    i2v_pool_run(gemm_part, &t, parts);
    free(coefs);
}

/* the entry points' common checks: the path to use (path < 0: the best), or -1 if the path is
 * unsupported or the sizes are inconsistent */
static int checked_path(int path, int M, int K, int N, size_t ldx, size_t ldy) {
    if (path < 0) path = i2v_best_path();
    if (!i2v_path_supported(path) || M < 0 || K < 0 || N < 0 || ldx < (size_t)K || ldy < (size_t)N) return -1;
    return path;
}

static int gemm_multi(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, int nmat,
                      const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy,
                      const float *wscale, const float *s, int path, int fmt) {
    if (nmat < 1 || nmat > I2V_MAX_MATS || fmt < 0 || fmt >= I2V_NFMTS) return -1;
    int p = path;
    for (int i = 0; i < nmat; i++)
        if ((p = checked_path(path, M, K, N[i], ldx, ldy[i])) < 0) return -1;
    path = p;
    if (M == 0) return 0;
    int Kb = (K + i2v_fmt_cols(fmt) - 1) / i2v_fmt_cols(fmt), mp;
    size_t kp;
    pad_geometry(path, fmt, M, K, &mp, &kp);
    int8_t *xpad = NULL;
    int32_t *sums = NULL;
    /* a ragged K (or M, for AMX) gets a zero-padded copy: Mp*Kp bytes, small next to the weights */
    if (kp != (size_t)K || mp != M) {
        xpad = (int8_t *)calloc((size_t)mp, kp);
        if (!xpad) return -2;
        for (int m = 0; m < M; m++) memcpy(xpad + (size_t)m * kp, x + (size_t)m * ldx, (size_t)K);
        x = xpad;
        ldx = kp;
    }
    if (!xsum) {
        sums = (int32_t *)malloc((size_t)M * sizeof(int32_t));
        if (!sums) {
            free(xpad);
            return -2;
        }
        for (int m = 0; m < M; m++) {
            int32_t s = 0;
            const int8_t *xm = x + (size_t)m * ldx;
            for (int k = 0; k < K; k++) s += xm[k];
            sums[m] = s;
        }
        xsum = sums;
    }
    gemm_padded(x, ldx, xsum, M, Kb, nmat, w, N, y, ldy, wscale, s, path, fmt);
    free(xpad);
    free(sums);
    return 0;
}

int i2v_gemm_multi_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, int nmat,
                       const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy, int path) {
    return gemm_multi(x, ldx, xsum, M, K, nmat, w, N, y, ldy, NULL, NULL, path, fmt);
}

int i2v_gemm_multi_f32_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, const float *s, int M,
                           int K, int nmat, const uint8_t *const *w, const int *N, const float *wscale,
                           float *const *y, const size_t *ldy, int path) {
    if (!s || !wscale || nmat < 1 || nmat > I2V_MAX_MATS) return -1;
    int32_t *yi[I2V_MAX_MATS];  /* the sums are written where their floats go, then converted */
    for (int i = 0; i < nmat; i++) yi[i] = (int32_t *)(void *)y[i];
    return gemm_multi(x, ldx, xsum, M, K, nmat, w, N, yi, ldy, wscale, s, path, fmt);
}

int i2v_gemm_fmt(int fmt, const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, const uint8_t *w,
                 int N, int32_t *y, size_t ldy, int path) {
    return i2v_gemm_multi_fmt(fmt, x, ldx, xsum, M, K, 1, &w, &N, &y, &ldy, path);
}

int i2v_gemm_multi(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, int nmat,
                   const uint8_t *const *w, const int *N, int32_t *const *y, const size_t *ldy, int path) {
    return i2v_gemm_multi_fmt(I2V_FMT_I2V, x, ldx, xsum, M, K, nmat, w, N, y, ldy, path);
}

int i2v_gemm_multi_f32(const int8_t *x, size_t ldx, const int32_t *xsum, const float *s, int M, int K,
                       int nmat, const uint8_t *const *w, const int *N, const float *wscale,
                       float *const *y, const size_t *ldy, int path) {
    return i2v_gemm_multi_f32_fmt(I2V_FMT_I2V, x, ldx, xsum, s, M, K, nmat, w, N, wscale, y, ldy, path);
}

int i2v_gemm(const int8_t *x, size_t ldx, const int32_t *xsum, int M, int K, const uint8_t *w,
             int N, int32_t *y, size_t ldy, int path) {
    return i2v_gemm_multi(x, ldx, xsum, M, K, 1, &w, &N, &y, &ldy, path);
}

static void quantize_path(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq, float *scale,
                          int32_t *qsum, int path) {
    switch (path) {
#if defined(__x86_64__) || defined(__i386__)
    case I2V_PATH_AMX:
    case I2V_PATH_AVX512VNNI: i2v_quant_avx512(x, ldx, M, K, q, ldq, scale, qsum); break;
    case I2V_PATH_AVX2: i2v_quant_avx2(x, ldx, M, K, q, ldq, scale, qsum); break;
#endif
    default: i2v_quant_scalar(x, ldx, M, K, q, ldq, scale, qsum); break;
    }
}

int i2v_linear(const float *x, size_t ldx, int M, int K, const uint8_t *w, int N, float wscale, float *y,
               size_t ldy, int path) {
    if ((path = checked_path(path, M, K, N, ldx, ldy)) < 0) return -1;
    if (M == 0 || N == 0) return 0;
    int Kb = (K + I2V_COLS - 1) / I2V_COLS, mp;
    size_t kp;
    pad_geometry(path, I2V_FMT_I2V, M, K, &mp, &kp);
    /* one scratch: q int8 [Mp, Kp] | s float [M] | qsum int32 [M]; the int32 sums go into y itself */
    size_t qbytes = ((size_t)mp * kp + 63) & ~(size_t)63;
    char *buf = (char *)malloc(qbytes + (size_t)M * 8);
    if (!buf) return -2;
    memset(buf + (size_t)M * kp, 0, (size_t)(mp - M) * kp);  /* AMX's padding rows */
    int8_t *q = (int8_t *)buf;
    float *s = (float *)(buf + qbytes);
    int32_t *qsum = (int32_t *)(s + M), *acc = (int32_t *)(void *)y;
    quantize_path(x, ldx, M, K, q, kp, s, qsum, path);
    gemm_padded(q, kp, qsum, M, Kb, 1, &w, &N, &acc, &ldy, &wscale, s, path, I2V_FMT_I2V);
    free(buf);
    return 0;
}

int i2v_quantize(const float *x, size_t ldx, int M, int K, int8_t *q, size_t ldq, float *scale,
                 int32_t *qsum, int path) {
    if ((path = checked_path(path, M, K, 0, ldx, ldq)) < 0 || ldq < (size_t)K) return -1;
    quantize_path(x, ldx, M, K, q, ldq, scale, qsum, path);
    return 0;
}

int i2v_has_avx512vbmi(void) { return cpu()->vbmi; }

/* The Q6 kernel of a path: AVX-512 VBMI on the AVX-512 paths when the CPU has it, else AVX2 on the
 * x86 paths, NEON on the NEON path, else the scalar reference. */
enum { Q6_SCALAR, Q6_AVX2, Q6_VBMI, Q6_NEON };

static int q6_kernel(int path) {
#if defined(__x86_64__) || defined(__i386__)
    if (i2v_path_has_avx512vnni(path) && cpu()->vbmi) return Q6_VBMI;
    if (path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path)) return Q6_AVX2;
#endif
#if defined(__aarch64__)
    if (path == I2V_PATH_NEON) return Q6_NEON;
#endif
    (void)path;
    return Q6_SCALAR;
}

i2v_q6_fn i2v_q6_kernel(int path) {
    int kernel = q6_kernel(path < 0 ? i2v_best_path() : path);
#if defined(__x86_64__) || defined(__i386__)
    if (kernel == Q6_VBMI) return i2v_q6_avx512vbmi;
    if (kernel == Q6_AVX2) return i2v_q6_avx2;
#endif
#if defined(__aarch64__)
    if (kernel == Q6_NEON) return i2v_q6_neon;
#endif
    (void)kernel;
    return i2v_q6_scalar;
}

const char *i2v_q6_kernel_name(int path) {
    static const char *const names[] = {"scalar", "avx2", "avx512vbmi", "neon"};
    return names[q6_kernel(path)];
}

typedef struct {
    i2v_q6_args a;
    i2v_q6_fn fn;
} q6_task;

static void q6_part(void *ctx, int p, int np) {
    const q6_task *t = (const q6_task *)ctx;
    long v0, v1;
    i2v_pool_split(t->a.V, p, np, &v0, &v1);
    if (v0 < v1) t->fn(&t->a, (int)v0, (int)v1);
}

int i2v_q6_gemv(const uint8_t *w, int V, int H, const int8_t *x, size_t ldx, const int32_t *xsum, int M,
                int32_t *out, size_t ldo, int path) {
    size_t hp = (size_t)(H + 63) / 64 * 64;
    if ((path = checked_path(path, M, H, V, ldx, ldo)) < 0 || ldx < hp) return -1;
    if (M == 0 || V == 0) return 0;
    int32_t *sums = NULL;
    if (!xsum) {
        if (!(sums = (int32_t *)malloc((size_t)M * sizeof(int32_t)))) return -2;
        for (int m = 0; m < M; m++) {
            int32_t s = 0;
            for (int h = 0; h < H; h++) s += x[(size_t)m * ldx + h];
            sums[m] = s;
        }
        xsum = sums;
    }
    q6_task t = {{w, V, H, x, ldx, xsum, M, out, ldo, NULL}, i2v_q6_kernel(path)};
    int16_t *x16 = NULL;
#if defined(__x86_64__) || defined(__i386__)
    if (t.fn == i2v_q6_avx2) {  /* it multiplies int16 activations: make them once, for every part */
        if (!(x16 = (int16_t *)malloc((size_t)M * hp * sizeof(int16_t)))) {
            free(sums);
            return -2;
        }
        i2v_q6_avx2_x16(x, ldx, M, hp, x16);
        t.a.x16 = x16;
    }
#endif
    long work = (long)V * (long)(hp / 64) * M;  /* 48-byte groups */
    int threads = i2v_pool_threads();
    int parts = work < 4096 || threads == 1 ? 1 : PARTS_PER_THREAD * threads;
    i2v_pool_run(q6_part, &t, parts);
    free(x16);
    free(sums);
    return 0;
}

typedef struct {
    const uint8_t *p;
    size_t n;
    uint64_t out[256];
} read_task;

static void read_part(void *ctx, int part, int np) {
    read_task *t = (read_task *)ctx;
    size_t lines = t->n / 256;  /* split on 256-byte steps */
    size_t a = lines * part / np * 256, b = lines * (part + 1) / np * 256;
    uint64_t acc = 0;
#if defined(__x86_64__) || defined(__i386__)
    if (cpu()->have[I2V_PATH_AVX512VNNI]) {
        t->out[part] = i2v_read_avx512(t->p + a, b - a);
        return;
    }
    if (cpu()->have[I2V_PATH_AVX2]) {
        t->out[part] = i2v_read_avx2(t->p + a, b - a);
        return;
    }
#endif
    for (size_t i = a; i + 8 <= b; i += 8) {
        uint64_t v;
        memcpy(&v, t->p + i, 8);
        acc ^= v;
    }
    t->out[part] = acc;
}

uint64_t i2v_read_bytes(const uint8_t *p, size_t n) {
    read_task t;
    t.p = p;
    t.n = n;
    int parts = i2v_pool_threads();
    if (parts > 256) parts = 256;
    memset(t.out, 0, sizeof t.out);
    i2v_pool_run(read_part, &t, parts);
    uint64_t acc = 0;
    for (int i = 0; i < parts; i++) acc ^= t.out[i];
    return acc;
}
