/* AMX-INT8 path for prefill (M >= i2v_amx_min_m: 20 rows for I2V, 16 for T5): tdpbsud, a 16x64 tile of
 * signed activations times a 16x64 tile of unsigned codes, 16x16 int32 sums per instruction (16K products).
 *
 * The I2V layout is already what the B tile wants: B row kk holds, for each of 16 outputs n, the
 * 4 codes of columns 4kk..4kk+3 in bytes 4n..4n+3, which is exactly (v >> 2s) & 3 of an I2V block
 * (lane n = row n, columns 4s..4s+3). So a B tile (64 columns) is four blocks unpacked with shifts
 * and masks, once per row block and reused by every tile of activation rows.
 *
 * Tiles: C00 C01 C10 C11 (tmm0-3) = 2 x 16 activation rows times 2 row blocks; A0 A1 (tmm4-5) are
 * the two row tiles, B0 B1 (tmm6-7) the two row blocks. The driver pads the activations to whole
 * 32-row, 64-column tiles with zeros; a missing second row block is unpacked as zero codes.
 * Below i2v_amx_min_m rows the AVX-512 VNNI kernel runs instead.
 *
 * T5 (formats/t5.py) takes the same tiles: a T5 block decoded digit by digit gives five such 64-byte
 * rows (digit j = columns 4j..4j+3 of the block), so the decoded rows of consecutive blocks are B rows in
 * column order, 16 to a tile; the rows past 20 Kb columns are zero codes (the activations are zero
 * there too, padded to whole 64-column tiles by the driver). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall() */
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "i2v.h"

#define TAMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* CPUID says AMX-TILE and AMX-INT8, and Linux grants this process the tile state */
int i2v_amx_init(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* B tiles of row block rb: [Kq/64][16 rows][64 bytes]; blocks past Kb (and a row block past Nb)
 * are zero codes */
TAMX static void unpack_b(const i2v_gemm_args *a, int rb, int valid, int nq, uint8_t *dst) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const uint8_t *w = a->w + (size_t)rb * a->Kb * I2V_BLOCK;
    for (int q = 0; q < nq; q++) {
        for (int i = 0; i < 4; i++) {
            int kb = 4 * q + i;
            uint8_t *out = dst + (size_t)q * 1024 + i * 256;
            if (!valid || kb >= a->Kb) {
                memset(out, 0, 256);
                continue;
            }
            __m512i v = _mm512_loadu_si512((const void *)(w + (size_t)kb * I2V_BLOCK));
            _mm512_storeu_si512((void *)out, _mm512_and_si512(v, m3));
            _mm512_storeu_si512((void *)(out + 64), _mm512_and_si512(_mm512_srli_epi16(v, 2), m3));
            _mm512_storeu_si512((void *)(out + 128), _mm512_and_si512(_mm512_srli_epi16(v, 4), m3));
            _mm512_storeu_si512((void *)(out + 192), _mm512_and_si512(_mm512_srli_epi16(v, 6), m3));
        }
    }
}

/* T5: the same B tiles from T5 blocks, t_j = (y_j >= 86) + (y_j >= 171) as min(y - c saturated, 1),
 * y_{j+1} = 3 y_j mod 256 */
TAMX static void unpack_b_t5(const i2v_gemm_args *a, int rb, int valid, int nq, uint8_t *dst) {
    size_t used = valid ? (size_t)a->Kb * 5 * 64 : 0, total = (size_t)nq * 1024;
    const __m512i one = _mm512_set1_epi8(1), c85 = _mm512_set1_epi8(85), c170 = _mm512_set1_epi8((char)170);
    const uint8_t *w = a->w + (size_t)rb * a->Kb * I2V_BLOCK;
    for (int kb = 0; valid && kb < a->Kb; kb++) {
        __m512i y = _mm512_loadu_si512((const void *)(w + (size_t)kb * I2V_BLOCK));
        for (int j = 0; j < 5; j++) {
            __m512i t = _mm512_add_epi8(_mm512_min_epu8(_mm512_subs_epu8(y, c85), one),
                                        _mm512_min_epu8(_mm512_subs_epu8(y, c170), one));
            _mm512_storeu_si512((void *)(dst + (size_t)(5 * kb + j) * 64), t);
            y = _mm512_add_epi8(y, _mm512_add_epi8(y, y));
        }
    }
    memset(dst + used, 0, total - used);
}

static void store_tile(const i2v_gemm_args *a, const int32_t *c, int m0, int rb) {
    for (int i = 0; i < 16 && m0 + i < a->M; i++) {
        int32_t *ym = a->y + (size_t)(m0 + i) * a->ldy;
        int32_t off = a->xsum[m0 + i];
        for (int j = 0; j < 16 && rb * 16 + j < a->N; j++) ym[rb * 16 + j] = c[i * 16 + j] - off;
    }
}

/* a->x: [ceil(M/32)*32, ldx] zero-padded, ldx >= 64 * ceil(Kb/4) */
/* Per-thread scratch kept between calls (the pool's threads persist; a fresh 256 KB block per call
 * would be mapped and page-faulted anew each time), freed when its thread exits. */
typedef struct {
    size_t bytes;
    uint8_t *p;
} scratch_t;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    scratch_t *s = (scratch_t *)v;
    free(s->p);
    free(s);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static uint8_t *thread_scratch(size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = (scratch_t *)calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (bytes > s->bytes) {
        free(s->p);
        s->p = (uint8_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        s->bytes = s->p ? bytes : 0;
    }
    return s->p;
}

/* Row-block pairs are unpacked a group at a time (up to GROUP_BYTES of B tiles, kept in L2) and
 * every 32-row tile of activations runs over the whole group before the next: each tile's int32
 * results then land in contiguous runs of the output rows (GROUP pairs x 128 bytes), instead of
 * 128-byte pieces scattered over all M rows per pair, which cost write misses once M x N x 4 bytes
 * outgrows L2 (measured: N = 6912, M = 256 ran at half speed). */
#define GROUP_BYTES (256 * 1024)

TAMX static void gemm_amx(const i2v_gemm_args *a, int rb0, int rb1, int fmt) {
    i2v_kernel_fn vnni = fmt == I2V_FMT_T5 ? t5_gemm_avx512vnni : i2v_gemm_avx512vnni;
    void (*unpack)(const i2v_gemm_args *, int, int, int, uint8_t *) = fmt == I2V_FMT_T5 ? unpack_b_t5 : unpack_b;
    if (a->M < i2v_amx_min_m(fmt)) {
        vnni(a, rb0, rb1);
        return;
    }
    int nq = fmt == I2V_FMT_T5 ? (a->Kb * T5_COLS + 63) / 64 : (a->Kb + 3) / 4;
    int mp = (a->M + 31) / 32 * 32;
    size_t pair_bytes = (size_t)nq * 2048;  /* B tiles of two row blocks */
    int group = (int)(GROUP_BYTES / pair_bytes);
    if (group < 1) group = 1;
    if (group > 16) group = 16;
    uint8_t *scratch = thread_scratch(pair_bytes * group + 4096);
    if (!scratch) {  /* out of memory: the VNNI kernel needs no scratch */
        vnni(a, rb0, rb1);
        return;
    }
    uint8_t *b = scratch;
    int32_t *c = (int32_t *)(scratch + pair_bytes * group);  /* 4 C tiles, 4 KB */
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    for (int g0 = rb0; g0 < rb1; g0 += 2 * group) {
        int g1 = g0 + 2 * group < rb1 ? g0 + 2 * group : rb1;
        for (int rb = g0; rb < g1; rb += 2) {
            uint8_t *b0 = b + (size_t)(rb - g0) / 2 * pair_bytes;
            unpack(a, rb, 1, nq, b0);
            unpack(a, rb + 1, rb + 1 < g1, nq, b0 + (size_t)nq * 1024);
        }
        for (int m0 = 0; m0 < mp; m0 += 32) {
            const int8_t *x0 = a->x + (size_t)m0 * a->ldx, *x1 = x0 + 16 * a->ldx;
            for (int rb = g0; rb < g1; rb += 2) {
                const uint8_t *b0 = b + (size_t)(rb - g0) / 2 * pair_bytes, *b1 = b0 + (size_t)nq * 1024;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int q = 0; q < nq; q++) {
                    _tile_loadd(4, x0 + 64 * q, a->ldx);
                    _tile_loadd(5, x1 + 64 * q, a->ldx);
                    _tile_loadd(6, b0 + (size_t)q * 1024, 64);
                    _tile_loadd(7, b1 + (size_t)q * 1024, 64);
                    _tile_dpbsud(0, 4, 6);
                    _tile_dpbsud(1, 4, 7);
                    _tile_dpbsud(2, 5, 6);
                    _tile_dpbsud(3, 5, 7);
                }
                _tile_stored(0, c, 64);
                _tile_stored(1, c + 256, 64);
                _tile_stored(2, c + 512, 64);
                _tile_stored(3, c + 768, 64);
                store_tile(a, c, m0, rb);
                store_tile(a, c + 512, m0 + 16, rb);
                if (rb + 1 < g1) {
                    store_tile(a, c + 256, m0, rb + 1);
                    store_tile(a, c + 768, m0 + 16, rb + 1);
                }
            }
        }
    }
    _tile_release();
}

TAMX void i2v_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1) { gemm_amx(a, rb0, rb1, I2V_FMT_I2V); }
TAMX void t5_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1) { gemm_amx(a, rb0, rb1, I2V_FMT_T5); }
#else
#include "i2v.h"

int i2v_amx_init(void) { return 0; }
#if defined(__x86_64__) || defined(__i386__)
/* never selected (i2v_amx_init is 0 here); keeps the dispatch table whole */
void i2v_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1) { i2v_gemm_avx512vnni(a, rb0, rb1); }
void t5_gemm_amx(const i2v_gemm_args *a, int rb0, int rb1) { t5_gemm_avx512vnni(a, rb0, rb1); }
#endif
#endif
