/* Exactness harness for the kernel library in C alone (no Python): every path this CPU supports
 * against a naive reference on random ternary weights, ragged shapes and extreme activations.
 * Built and run by tests/kernels/test_c_harness.py, natively and, when a cross compiler and
 * qemu-user are installed, for AArch64 (the NEON path). Prints one line per path; exit 1 on a
 * mismatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "i2v.h"

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

static int check(int M, int N, int K, int extreme) {
    int8_t *w = malloc((size_t)N * K), *x = malloc((size_t)M * K);
    uint8_t *p = malloc((size_t)((N + 15) / 16) * ((K + 15) / 16) * 64);
    int32_t *ref = malloc((size_t)M * N * 4), *y = malloc((size_t)M * N * 4);
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = (int8_t)(next() % 3) - 1;
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = extreme ? (extreme > 0 ? 127 : -128) : (int8_t)(next() & 255);
    pack(w, N, K, p);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            int32_t s = 0;
            for (int k = 0; k < K; k++) s += x[(size_t)m * K + k] * w[(size_t)n * K + k];
            ref[(size_t)m * N + n] = s;
        }
    int bad = 0;
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        memset(y, 0x7f, (size_t)M * N * 4);
        if (i2v_gemm(x, (size_t)K, NULL, M, K, p, N, y, (size_t)N, path) != 0 ||
            memcmp(y, ref, (size_t)M * N * 4) != 0) {
            printf("MISMATCH path %s M %d N %d K %d extreme %d\n", i2v_path_name(path), M, N, K, extreme);
            bad = 1;
        }
    }
    free(w), free(x), free(p), free(ref), free(y);
    return bad;
}

/* Q6 rows as documented (formats/q6.py): column 64g + 8L + j at bits 6j of the little-endian 6-byte
 * piece L of group g, code q + 32; padding columns code 32 */
static int check_q6(int M, int V, int H) {
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
    int bad = 0;
    for (int path = 0; path < I2V_NPATHS; path++) {
        if (!i2v_path_supported(path)) continue;
        if (i2v_q6_gemv(p, V, H, x, (size_t)hp, NULL, M, y, (size_t)V, path) != 0 ||
            memcmp(y, ref, (size_t)M * V * 4) != 0) {
            printf("MISMATCH q6 path %s M %d V %d H %d\n", i2v_path_name(path), M, V, H);
            bad = 1;
        }
    }
    free(q), free(x), free(p), free(ref), free(y);
    return bad;
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

int main(void) {
    static const int shapes[][3] = {{1, 1, 1}, {1, 17, 15}, {1, 64, 2560}, {1, 129, 48}, {3, 33, 100},
                                    {8, 16, 16}, {17, 65, 129}, {20, 100, 333}, {33, 48, 64}, {64, 31, 200}};
    int bad = 0, n = (int)(sizeof shapes / sizeof shapes[0]);
    for (int t = 1; t <= 2; t++) {
        i2v_pool_set_threads(t);
        for (int i = 0; i < n; i++)
            for (int e = -1; e <= 1; e++) bad |= check(shapes[i][0], shapes[i][1], shapes[i][2], e);
    }
    for (int i = 0; i < 40; i++) bad |= check(1 + next() % 24, 1 + next() % 300, 1 + next() % 700, 0);
    bad |= check_nested();
    bad |= check_q6(1, 1, 1) | check_q6(1, 37, 100) | check_q6(2, 301, 640) | check_q6(3, 8, 2560);
    for (int path = 0; path < I2V_NPATHS; path++)
        if (i2v_path_supported(path)) printf("path %s: %s\n", i2v_path_name(path), bad ? "FAILED" : "exact");
    return bad;
}
