/* The inner loops of attention over the KV cache (bitnet_impl.h scores_fn, pv_fn), per KV element type
 * (BN_F32, BN_F16, BN_Q8_0) and instruction set, and the q8_0 row quantizer of the KV store.
 *
 * Values, and f32 and f16 keys, are widened to float32 in registers as they are loaded (no f32 copy of the
 * cache): f16 by vcvtph2ps (NEON: fcvtl), q8_0 (formats/q8_0.py: per 32 values an f16 scale d and 32 int8
 * q) as d * q, exact in float32 (an 11-bit by 8-bit product). So p.v computes on exactly the values
 * formats/q8_0.dequantize gives, with float32 probabilities.
 * q8_0 keys are cached in tiles of 16 keys (below, "q8_0 keys in tiles") and scored as llama.cpp scores
 * q8_0 keys: q quantized to q8_0 too, exact int8 dot products per block, then float steps in a fixed order
 * (every path gives the scalar reference's bits). Over rows, each key's 512 products for its 4 q heads
 * took 32 AVX-512 FMAs plus the widening and a sum across lanes, and one core ran the scores at 9 GB/s of
 * q8_0 in L2 and 5.9-7 from DRAM, where a plain read streams 12: from DRAM a key cost about the sum of its
 * arithmetic and its bytes. Over tiles it is 8 vpdpbusd a key for its 4 q heads (lanes = keys, no sums
 * across lanes): 3-4x the rows' rate in L2 and ~1.5x from DRAM (benchmarks/README.md, "sixth session").
 * p.v's arithmetic stays float: 32 FMAs a value row at the 2B4T shape, 11 GB/s of q8_0 in L2 and ~6.8 from
 * DRAM (benchmarks/kv_attention_c.c measures the loops; benchmarks/port_probe.c the core's FMA rate).
 *
 * Shapes: q [nq, hd] (the nq q heads of one kv head, rows hd apart), k_j = k + j * ldk bytes (key j's
 * row of hd elements), p [nq, ldp] (probabilities), o [nq, hd]; over q8_0 keys q and k are as
 * bitnet_impl.h's scores_fn says (bn_kt_query rows, tiles).
 * Fixed order: each score is one dot product summed in an order fixed by hd and the path (never by
 * the key's place in a call: a key batch short of a whole group repeats its last key; q8_0 tiles in the
 * order of every path), and pv adds each o element's terms one after another in key order, so calls over
 * keys 0..a and a..n give the bits of one call over 0..n (q8_0 keys: a % 16 == 0, a call starts at a tile). */
#include <math.h>
#include <string.h>

#include "bitnet_impl.h"

static inline float f16_to_f32(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* element i of a row of kind `kind` */
static inline float kv_at(int kind, const uint8_t *row, int i) {
    if (kind == BN_F16) return f16_to_f32(row + 2 * (size_t)i);
    if (kind == BN_Q8_0) {
        const uint8_t *b = row + (size_t)(i / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES;
        return f16_to_f32(b) * (float)(int8_t)b[2 + i % BN_Q8_0_BLOCK];
    }
    float f;
    memcpy(&f, row + 4 * (size_t)i, 4);
    return f;
}

/* q8_0 blocks of a row of hd values (the last one padded with zeros) */
static inline int q8_0_blocks(int hd) { return (hd + BN_Q8_0_BLOCK - 1) / BN_Q8_0_BLOCK; }

size_t bn_kv_row_bytes(int kind, int hd) {
    if (kind == BN_Q8_0) return (size_t)q8_0_blocks(hd) * BN_Q8_0_BYTES;
    return (size_t)hd * (kind == BN_F16 ? 2 : 4);
}

/* x [n] -> one q8_0 row, as llama.cpp's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1 / d))
 * (half away from zero), d stored as f16; a last block short of 32 values is padded with zeros */
void bn_q8_0_row(const float *x, int n, uint8_t *dst) {
    for (int b0 = 0; b0 < n; b0 += BN_Q8_0_BLOCK, dst += BN_Q8_0_BYTES) {
        int nb = n - b0 < BN_Q8_0_BLOCK ? n - b0 : BN_Q8_0_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < nb; i++) amax = fabsf(x[b0 + i]) > amax ? fabsf(x[b0 + i]) : amax;
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        _Float16 h = (_Float16)d;
        memcpy(dst, &h, 2);
        for (int i = 0; i < BN_Q8_0_BLOCK; i++) dst[2 + i] = (uint8_t)(int8_t)(i < nb ? roundf(x[b0 + i] * id) : 0.0f);
    }
}

/* ---- the KV store, one row of n values (kvput_fn) ---- */
static void put_f32(const float *x, int n, void *dst) { memcpy(dst, x, sizeof(float) * (size_t)n); }

static void put_f16_scalar(const float *x, int n, void *dst) {
    for (int i = 0; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)x[i];
}

static void put_q8_0_scalar(const float *x, int n, void *dst) { bn_q8_0_row(x, n, (uint8_t *)dst); }

/* ---- scalar: the reference ---- */
static inline void scores_scalar(int kind, const float *q, int nq, int hd, const uint8_t *k, size_t ldk, int n,
                                 float scale, float *out, size_t ldo) {
    for (int j = 0; j < n; j++) {
        const uint8_t *kj = k + (size_t)j * ldk;
        for (int r = 0; r < nq; r++) {
            const float *qr = q + (size_t)r * hd;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            int i = 0;
            for (; i + 4 <= hd; i += 4) {
                s0 += qr[i] * kv_at(kind, kj, i);
                s1 += qr[i + 1] * kv_at(kind, kj, i + 1);
                s2 += qr[i + 2] * kv_at(kind, kj, i + 2);
                s3 += qr[i + 3] * kv_at(kind, kj, i + 3);
            }
            for (; i < hd; i++) s0 += qr[i] * kv_at(kind, kj, i);
            out[(size_t)r * ldo + j] = ((s0 + s1) + (s2 + s3)) * scale;
        }
    }
}

/* the reference requests nothing (ahead: bitnet_impl.h) */
static inline void pv_scalar(int kind, float *o, int nq, int hd, const float *p, size_t ldp, const uint8_t *v,
                             size_t ldv, int n, const bn_ahead *ahead) {
    (void)ahead;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < hd; i++) {
            float x = kv_at(kind, v + (size_t)j * ldv, i);
            for (int r = 0; r < nq; r++) o[(size_t)r * hd + i] += p[(size_t)r * ldp + j] * x;
        }
}

#define KINDS(ATTR, isa)                                                                                          \
    ATTR static void scores_##isa##_f32(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float s, \
                                   float *out, size_t ldo) {                                                \
        scores_##isa(BN_F32, (const float *)q, nq, hd, (const uint8_t *)k, ldk, n, s, out, ldo);             \
    }                                                                                                          \
    ATTR static void scores_##isa##_f16(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float s, \
                                   float *out, size_t ldo) {                                                \
        scores_##isa(BN_F16, (const float *)q, nq, hd, (const uint8_t *)k, ldk, n, s, out, ldo);             \
    }                                                                                                          \
    ATTR static void pv_##isa##_f32(float *o, int nq, int hd, const float *p, size_t ldp, const void *v, size_t ldv, \
                               int n, const bn_ahead *ahead) {                                              \
        pv_##isa(BN_F32, o, nq, hd, p, ldp, (const uint8_t *)v, ldv, n, ahead);                              \
    }                                                                                                          \
    ATTR static void pv_##isa##_f16(float *o, int nq, int hd, const float *p, size_t ldp, const void *v, size_t ldv, \
                               int n, const bn_ahead *ahead) {                                              \
        pv_##isa(BN_F16, o, nq, hd, p, ldp, (const uint8_t *)v, ldv, n, ahead);                              \
    }                                                                                                          \
    ATTR static void pv_##isa##_q8_0(float *o, int nq, int hd, const float *p, size_t ldp, const void *v,          \
                                size_t ldv, int n, const bn_ahead *ahead) {                                 \
        pv_##isa(BN_Q8_0, o, nq, hd, p, ldp, (const uint8_t *)v, ldv, n, ahead);                             \
    }

KINDS(, scalar)

/* ---- q8_0 keys in tiles of BN_KT = 16 keys (bitnet_impl.h; formats/q8_0.py tile_keys draws it) ----
 * For each q8_0 block b of the row, KT_BLK = 544 bytes (its 16 rows' share of the tile):
 *   bytes 0 .. 31                    the 16 keys' f16 scales, in key order
 *   byte 32 + 64 g + 4 key + e       element 4 g + e of the block (g = 0 .. 7, e = 0 .. 3) of key `key`
 * so a 64-byte load holds 4 elements of 16 keys and a 32-bit lane holds one key's 4: the dot products run
 * with lanes = keys (vpdpbusd; pmaddubsw + pmaddwd; NEON's widening multiplies), with no sums across
 * lanes, where over rows each key's 128 products had to be summed across a register. The scores are
 * llama.cpp's q8_0 dot (q quantized to q8_0 too, scale d_q), in float steps every path takes in this
 * order, so every path gives the scalar reference's bits:
 *   s = 0; for each block b: s = fma((float)isum_b, d_k,b * (d_q,b * scale), s)
 * with isum_b the exact int32 dot of the block's int8 (|isum_b| <= 32 * 127^2 < 2^24: exact in float). */
#define KT_BLK (BN_KT * BN_Q8_0_BYTES)

void bn_kt_put(const uint8_t *row, size_t ld, uint8_t *tile, int lane) {
    for (size_t b = 0; b < ld / BN_Q8_0_BYTES; b++) {
        const uint8_t *src = row + b * BN_Q8_0_BYTES;
        uint8_t *t = tile + b * KT_BLK;
        memcpy(t + 2 * lane, src, 2);
        for (int g = 0; g < 8; g++) memcpy(t + 32 + 64 * g + 4 * lane, src + 2 + 4 * g, 4);
    }
}

/* q for the tile kernels (bn_kt_query): each q head as its q8_0 row, then the row's blocks' sums of int8 as
 * int32 (for vpdpbusd's unsigned offset), made once a step by attention.c for all the calls over its keys */
size_t bn_kt_query_bytes(int hd) { return (size_t)q8_0_blocks(hd) * (BN_Q8_0_BYTES + 4); }

void bn_kt_query(kvput_fn put, const float *x, int hd, uint8_t *dst) {
    int nb = q8_0_blocks(hd);
    put(x, hd, dst);
    for (int b = 0; b < nb; b++) {
        int32_t sum = 0;
        for (int i = 0; i < BN_Q8_0_BLOCK; i++) sum += (int8_t)dst[b * BN_Q8_0_BYTES + 2 + i];
        memcpy(dst + (size_t)nb * BN_Q8_0_BYTES + 4 * (size_t)b, &sum, 4);
    }
}

/* q's rows r0 .. r0 + 3 of a call (a short group repeats row r0, computed and not stored): their rows,
 * d_q * scale and 128 x the sum of each block */
typedef struct {
    const uint8_t *row[4];
    int32_t sum128[4][32];
    float dqs[4][32];
} kt_query;

static inline int kt_query_rows(const uint8_t *q, int hd, int nq, int r0, float scale, kt_query *z) {
    int nr = nq - r0 < 4 ? nq - r0 : 4, nb = q8_0_blocks(hd);
    size_t ld = bn_kt_query_bytes(hd);
    for (int r = 0; r < 4; r++) {
        const uint8_t *qr = z->row[r] = q + (size_t)(r0 + (r < nr ? r : 0)) * ld;
        for (int b = 0; b < nb; b++) {
            int32_t sum;
            memcpy(&sum, qr + (size_t)nb * BN_Q8_0_BYTES + 4 * (size_t)b, 4);
            z->sum128[r][b] = 128 * sum;
            z->dqs[r][b] = f16_to_f32(qr + (size_t)b * BN_Q8_0_BYTES) * scale;
        }
    }
    return nr;
}

/* elements 4 g .. 4 g + 3 of block b of a q row, as one int32 */
static inline int32_t kt_q4(const uint8_t *row, int b, int g) {
    int32_t v;
    memcpy(&v, row + (size_t)b * BN_Q8_0_BYTES + 2 + 4 * g, 4);
    return v;
}

static void scores_scalar_kt(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float scale, float *out,
                             size_t ldo) {
    const uint8_t *q8 = (const uint8_t *)q, *kt = (const uint8_t *)k;
    const int nb = q8_0_blocks(hd);
    const size_t lq = bn_kt_query_bytes(hd);
    for (int j = 0; j < n; j++) {
        const uint8_t *tile = kt + (size_t)(j / BN_KT) * BN_KT * ldk;
        int lane = j % BN_KT;
        for (int r = 0; r < nq; r++) {
            float s = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *t = tile + (size_t)b * KT_BLK;
                const uint8_t *qb = q8 + (size_t)r * lq + (size_t)b * BN_Q8_0_BYTES;
                int32_t isum = 0;
                for (int i = 0; i < BN_Q8_0_BLOCK; i++)
                    isum += (int8_t)t[32 + 64 * (i / 4) + 4 * lane + i % 4] * (int8_t)qb[2 + i];
                s = fmaf((float)isum, f16_to_f32(t + 2 * lane) * (f16_to_f32(qb) * scale), s);
            }
            out[(size_t)r * ldo + j] = s;
        }
    }
}

/* ---- shared by the SIMD kernels ---- */

/* the cache lines of rows j .. j + nrows - 1 (clamped to the n rows of the call), requested ahead of use,
 * into L2 (locality 2, prefetcht1 on x86; every path, NEON's untimed): one core left to the hardware
 * prefetcher alone read the cache at about half the bandwidth a plain read of it reaches. 16 rows into L2,
 * with attention.c's requests for the first rows of each run, read from DRAM 4-18% faster than 8 rows
 * into L1 (benchmarks/README.md, fifth session; distance and level not told apart); more rows, or a
 * second, farther request, were slower: each request holds a fill buffer until its line arrives */
#define KV_PREFETCH 16 /* rows ahead */
/* p.v's value rows a block: every column slice of o runs over a block before the next rows are read, so
 * the rows stream in all through the loop (one pass a slice over the whole call read them in the first
 * pass only, and the memory idled during the others) */
#define PV_KEYS 8
/* AVX2's block: 16 rows, each column pass requesting its share of the next block's rows (2 of 16 at 128
 * columns) and of the ahead stream, not all at the block's start: at d = 4000 on Zen 3, p.v took 8-10%
 * less time against the scores than 8 rows requested at once (16 at once: 11-20% more; benchmarks/README.md,
 * twelfth session) */
#define PV_KEYS_AVX2 16
static inline void prefetch_rows(const uint8_t *base, size_t ld, int j, int nrows, int n) {
    for (int x = j; x < j + nrows && x < n; x++)
        for (size_t b = 0; b < ld; b += 64) __builtin_prefetch(base + (size_t)x * ld + b, 0, 2);
}

/* the tile KV_PREFETCH keys on from key j's, for the tile kernels to request while they work on tile j;
 * NULL when it holds no key of the call */
static inline const uint8_t *next_tile(const uint8_t *k, size_t ldk, int j, int n) {
    int t = (j + KV_PREFETCH) / BN_KT * BN_KT;
    return t < n ? k + (size_t)t * ldk : NULL;
}

/* next_tile whole at once (a tile's keys are interleaved, so all of it): the NEON tile scores. The AVX-512
 * and AVX2 ones request it a line at a time over their work instead (AVX2: over the first half of the
 * tile's keys): in bursts the memory answered more slowly (AVX-512 tile scores from DRAM 14.0-15.1 GB/s
 * spread, against 12.5-13.1, one core; AVX2 on Zen 3 at d = 4000, 7% less time against p.v:
 * benchmarks/README.md, twelfth session) */
static inline void prefetch_tile(const uint8_t *k, size_t ldk, int j, int n) {
    const uint8_t *t = next_tile(k, ldk, j, n);
    for (size_t b = 0; t && b < BN_KT * ldk; b += 64) __builtin_prefetch(t + b, 0, 2);
}

/* The line-at-a-time form: the next tile's lines past 8 a block (its last nb / 2, rounded up) now; the
 * kernel requests line 8 b + g of the tile returned (NULL: none) at its step (b, g) */
static inline const uint8_t *prefetch_tile_tail(const uint8_t *k, size_t ldk, int j, int n, int nb) {
    const uint8_t *t = next_tile(k, ldk, j, n);
    for (size_t y = 64 * 8 * (size_t)nb; t && y < BN_KT * ldk; y += 64) __builtin_prefetch(t + y, 0, 2);
    return t;
}

/* p.v's walk over `ahead` (bitnet_impl.h): at each of the call's n keys (in the first group of q rows; in
 * its first column pass, or for the AVX2 p.v spread over its column passes), the next lines of the stream,
 * L / n of them or one more (a running remainder, no division a key), so that its L lines (from the one p
 * falls in) are requested evenly over the call. Requested at once before p.v (the next unit's first rows,
 * before), the memory answered more slowly: benchmarks/README.md, "eighth session". Addresses as integers:
 * the first line may start before p. */
typedef struct {
    uintptr_t line;          /* the next line to request */
    size_t per, rem, acc, n; /* L / n, L % n, the remainder so far, and n steps */
} ahead_walk;

static inline ahead_walk ahead_begin(const bn_ahead *a, int n) {
    ahead_walk w = {0, 0, 0, 0, (size_t)(n > 0 ? n : 1)};
    if (a && a->p && a->bytes && n > 0) {
        uintptr_t first = (uintptr_t)a->p & ~(uintptr_t)63, end = (uintptr_t)a->p + a->bytes;
        size_t lines = (size_t)((end - first + 63) / 64);
        w.line = first;
        w.per = lines / w.n;
        w.rem = lines % w.n;
    }
    return w;
}

static inline void ahead_step(ahead_walk *w) {
    size_t k = w->per;
    if ((w->acc += w->rem) >= w->n) w->acc -= w->n, k++;
    for (; k; k--, w->line += 64) __builtin_prefetch((const void *)w->line, 0, 2);
}

/* p.v's rows r0 .. r0 + 3 of p [nq, ldp] and o [nq, hd], in pr and orow. Short groups repeat their
 * first row: the repeats compute and store the same values. */
static inline void group_rows(int r0, int nq, const float *p, size_t ldp, float *o, int hd, const float *pr[4],
                             float *orow[4]) {
    int nr = nq - r0 < 4 ? nq - r0 : 4;
    for (int r = 0; r < 4; r++) {
        int rr = r0 + (r < nr ? r : 0);
        pr[r] = p + (size_t)rr * ldp;
        orow[r] = o + (size_t)rr * hd;
    }
}

/* keys j .. j + 3 of a call's n in kj (a batch short of 4 repeats its last key), and the rows KV_PREFETCH
 * further on requested */
static inline void group_keys(const uint8_t *k, size_t ldk, int j, int n, const uint8_t *kj[4]) {
    for (int x = 0; x < 4; x++) kj[x] = k + (size_t)(j + x < n ? j + x : n - 1) * ldk;
    prefetch_rows(k, ldk, j + KV_PREFETCH, 4, n);
}

/* 4 q rows of q [nq, hd] in qr: short groups repeat row r0 (their scores are computed, not stored) */
static inline int group_q(int r0, int nq, const float *q, int hd, const float *qr[4]) {
    int nr = nq - r0 < 4 ? nq - r0 : 4;
    for (int r = 0; r < 4; r++) qr[r] = q + (size_t)(r0 + (r < nr ? r : 0)) * hd;
    return nr;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

/* ---- AVX-512: 16 elements a register ---- */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"), always_inline)) static inline

T512 __m512 ld16(int kind, const uint8_t *row, int i) {
    if (kind == BN_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)i)));
    if (kind == BN_Q8_0) {
        const uint8_t *b = row + (size_t)(i / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES;
        __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + i % BN_Q8_0_BLOCK));
        __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        uint16_t h;
        memcpy(&h, b, 2);
        return _mm512_mul_ps(x, _mm512_set1_ps(_cvtsh_ss(h)));
    }
    return _mm512_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i));
}

/* elements i .. i + 31 (i % 32 == 0): for q8_0 one block, its scale widened once */
T512 void ld32(int kind, const uint8_t *row, int i, __m512 *a, __m512 *b) {
    if (kind == BN_Q8_0) {
        const uint8_t *blk = row + (size_t)(i / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES;
        uint16_t h;
        memcpy(&h, blk, 2);
        __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
        *a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))), d);
        *b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))), d);
        return;
    }
    *a = ld16(kind, row, i);
    *b = ld16(kind, row, i + 16);
}

/* 16 registers -> their 16 sums, every sum by the same tree (halves, quarters, then pairs): out[4 * (v % 4)
 * + v / 4] = sum of v[v] (the 4 x 4 block of q rows by keys comes out transposed) */
T512 __m512 sum16x16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; k++)
        t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xDD));
    __m512 w01 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    __m512 w23 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(w01), _mm512_castps_pd(w23))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(w01), _mm512_castps_pd(w23))));
}

/* 4 q rows by 4 keys a pass, hd % 16 == 0: 16 accumulators, each key row widened once for the 4 rows */
T512 void scores_avx512(int kind, const float *q, int nq, int hd, const uint8_t *k, size_t ldk, int n, float scale,
                        float *out, size_t ldo) {
    __m512 sc = _mm512_set1_ps(scale);
    const __m512i tr = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *qr[4];
        int nr = group_q(r0, nq, q, hd, qr);
        for (int j = 0; j < n; j += 4) {
            const uint8_t *kj[4];
            group_keys(k, ldk, j, n, kj);
            __m512 acc[16];
            for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
            int i = 0;
            for (; i + 32 <= hd; i += 32) { /* each accumulator: elements i .. i + 15, then i + 16 .. i + 31 */
                __m512 q0 = _mm512_loadu_ps(qr[0] + i), q1 = _mm512_loadu_ps(qr[1] + i);
                __m512 q2 = _mm512_loadu_ps(qr[2] + i), q3 = _mm512_loadu_ps(qr[3] + i);
                __m512 p0 = _mm512_loadu_ps(qr[0] + i + 16), p1 = _mm512_loadu_ps(qr[1] + i + 16);
                __m512 p2 = _mm512_loadu_ps(qr[2] + i + 16), p3 = _mm512_loadu_ps(qr[3] + i + 16);
                for (int x = 0; x < 4; x++) {
                    __m512 ka, kb;
                    ld32(kind, kj[x], i, &ka, &kb);
                    acc[x] = _mm512_fmadd_ps(p0, kb, _mm512_fmadd_ps(q0, ka, acc[x]));
                    acc[4 + x] = _mm512_fmadd_ps(p1, kb, _mm512_fmadd_ps(q1, ka, acc[4 + x]));
                    acc[8 + x] = _mm512_fmadd_ps(p2, kb, _mm512_fmadd_ps(q2, ka, acc[8 + x]));
                    acc[12 + x] = _mm512_fmadd_ps(p3, kb, _mm512_fmadd_ps(q3, ka, acc[12 + x]));
                }
            }
            if (i < hd) {
                __m512 q0 = _mm512_loadu_ps(qr[0] + i), q1 = _mm512_loadu_ps(qr[1] + i);
                __m512 q2 = _mm512_loadu_ps(qr[2] + i), q3 = _mm512_loadu_ps(qr[3] + i);
                for (int x = 0; x < 4; x++) {
                    __m512 kx = ld16(kind, kj[x], i);
                    acc[x] = _mm512_fmadd_ps(q0, kx, acc[x]);
                    acc[4 + x] = _mm512_fmadd_ps(q1, kx, acc[4 + x]);
                    acc[8 + x] = _mm512_fmadd_ps(q2, kx, acc[8 + x]);
                    acc[12 + x] = _mm512_fmadd_ps(q3, kx, acc[12 + x]);
                }
            }
            /* lanes 4 * key + row -> 4 * row + key, then row r's 4 keys (lanes 4r .. 4r + 3) to its scores */
            __m512 s = _mm512_permutexvar_ps(tr, _mm512_mul_ps(sum16x16(acc), sc));
            __mmask16 keys = (__mmask16)((1u << (n - j < 4 ? n - j : 4)) - 1);
            for (int r = 0; r < nr; r++)
                _mm512_mask_storeu_ps(out + (size_t)(r0 + r) * ldo + j - 4 * r, (__mmask16)(keys << (4 * r)), s);
        }
    }
}

/* 4 rows of o by 64 columns (then 16) in registers while a block of PV_KEYS value rows streams past, then
 * the next columns over the same rows, hd % 16 == 0 */
T512 void pv_avx512(int kind, float *o, int nq, int hd, const float *p, size_t ldp, const uint8_t *v, size_t ldv,
                    int n, const bn_ahead *ahead) {
    ahead_walk aw = ahead_begin(ahead, n); /* a step a key of the pass over columns 0 .. */
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *pr[4];
        float *orow[4];
        group_rows(r0, nq, p, ldp, o, hd, pr, orow);
        for (int jb = 0; jb < n; jb += PV_KEYS) {
            int je = jb + PV_KEYS < n ? jb + PV_KEYS : n, c = 0;
            for (; c + 64 <= hd; c += 64) {
                __m512 acc[16];
                for (int r = 0; r < 4; r++)
                    for (int x = 0; x < 4; x++) acc[4 * r + x] = _mm512_loadu_ps(orow[r] + c + 16 * x);
                for (int j = jb; j < je; j++) {
                    const uint8_t *vj = v + (size_t)j * ldv;
                    if (c == 0) {
                        prefetch_rows(v, ldv, j + KV_PREFETCH, 1, n);
                        if (r0 == 0) ahead_step(&aw);
                    }
                    __m512 v0, v1, v2, v3;
                    ld32(kind, vj, c, &v0, &v1);
                    ld32(kind, vj, c + 32, &v2, &v3);
                    for (int r = 0; r < 4; r++) {
                        __m512 w = _mm512_set1_ps(pr[r][j]);
                        acc[4 * r] = _mm512_fmadd_ps(w, v0, acc[4 * r]);
                        acc[4 * r + 1] = _mm512_fmadd_ps(w, v1, acc[4 * r + 1]);
                        acc[4 * r + 2] = _mm512_fmadd_ps(w, v2, acc[4 * r + 2]);
                        acc[4 * r + 3] = _mm512_fmadd_ps(w, v3, acc[4 * r + 3]);
                    }
                }
                for (int r = 3; r >= 0; r--) /* row 0 last: a repeated row stores row 0's values */
                    for (int x = 0; x < 4; x++) _mm512_storeu_ps(orow[r] + c + 16 * x, acc[4 * r + x]);
            }
            for (; c < hd; c += 16) {
                __m512 acc[4];
                for (int r = 0; r < 4; r++) acc[r] = _mm512_loadu_ps(orow[r] + c);
                for (int j = jb; j < je; j++) {
                    if (c == 0 && r0 == 0) ahead_step(&aw); /* hd < 64: this is the first pass */
                    __m512 v0 = ld16(kind, v + (size_t)j * ldv, c);
                    for (int r = 0; r < 4; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j]), v0, acc[r]);
                }
                for (int r = 3; r >= 0; r--) _mm512_storeu_ps(orow[r] + c, acc[r]);
            }
        }
    }
}

KINDS(__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))), avx512)

/* q8_0 tiles, 4 q rows by a tile of 16 keys a pass: per block, 8 vpdpbusd a row (k + 128 unsigned, the
 * offset taken off with the block's 128 x sum of q), then the float step of kvops.c's tiles */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma"))) static void
scores_avx512_kt(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float scale, float *out, size_t ldo) {
    const uint8_t *kt = (const uint8_t *)k;
    const int nb = q8_0_blocks(hd);
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    kt_query z;
    for (int r0 = 0; r0 < nq; r0 += 4) {
        int nr = kt_query_rows((const uint8_t *)q, hd, nq, r0, scale, &z);
        for (int j = 0; j < n; j += BN_KT) {
            const uint8_t *tile = kt + (size_t)j * ldk;
            const uint8_t *next = prefetch_tile_tail(kt, ldk, j, n, nb); /* 8 lines a block in the loop below */
            __m512 s[4];
            for (int r = 0; r < 4; r++) s[r] = _mm512_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *t = tile + (size_t)b * KT_BLK;
                __m512i acc[4];
                for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_si512();
                for (int g = 0; g < 8; g++) {
                    if (next) __builtin_prefetch(next + 64 * (size_t)(8 * b + g), 0, 2);
                    __m512i kv = _mm512_xor_si512(_mm512_loadu_si512(t + 32 + 64 * g), x80);
                    for (int r = 0; r < 4; r++) acc[r] = _mm512_dpbusd_epi32(acc[r], kv, _mm512_set1_epi32(kt_q4(z.row[r], b, g)));
                }
                __m512 dk = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t));
                for (int r = 0; r < 4; r++) {
                    __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], _mm512_set1_epi32(z.sum128[r][b])));
                    s[r] = _mm512_fmadd_ps(x, _mm512_mul_ps(dk, _mm512_set1_ps(z.dqs[r][b])), s[r]);
                }
            }
            __mmask16 keys = (__mmask16)(n - j >= BN_KT ? 0xFFFFu : (1u << (n - j)) - 1);
            for (int r = 0; r < nr; r++) _mm512_mask_storeu_ps(out + (size_t)(r0 + r) * ldo + j, keys, s[r]);
        }
    }
}

/* bn_q8_0_row in registers, bit for bit: the same amax, d = amax / 127 and 1 / d in float32, the same
 * products x * (1 / d), and roundf's half-away-from-zero as t = trunc(y), t + sign(y) where |y - t| >= 0.5
 * (exact: y - t is exact for |y| <= 127) */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static void put_q8_0_avx512(const float *x, int n,
                                                                                        void *dst) {
    uint8_t *o = (uint8_t *)dst;
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), one = _mm512_set1_epi32(0x3F800000);
    const __m512 half = _mm512_set1_ps(0.5f);
    for (int b0 = 0; b0 < n; b0 += BN_Q8_0_BLOCK, o += BN_Q8_0_BYTES) {
        int nb = n - b0 < BN_Q8_0_BLOCK ? n - b0 : BN_Q8_0_BLOCK;
        __mmask16 m0 = (__mmask16)(nb >= 16 ? 0xFFFFu : (1u << nb) - 1);
        __mmask16 m1 = (__mmask16)(nb >= 32 ? 0xFFFFu : nb > 16 ? (1u << (nb - 16)) - 1 : 0u);
        __m512 v[2] = {_mm512_maskz_loadu_ps(m0, x + b0), _mm512_maskz_loadu_ps(m1, x + b0 + 16)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(o, &h, 2);
        for (int k = 0; k < 2; k++) {
            __m512 y = _mm512_mul_ps(v[k], _mm512_set1_ps(id));
            __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), half, _CMP_GE_OQ);
            __m512 sgn = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(y), sign), one));
            t = _mm512_mask_add_ps(t, up, t, sgn);
            _mm_storeu_si128((__m128i *)(o + 2 + 16 * k), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t)));
        }
    }
}

/* ---- AVX2: 8 elements a register ---- */
#define T256 __attribute__((target("avx2,f16c,fma"), always_inline)) static inline

/* 8 elements of a row from column i (i % 8 == 0) as floats; q8_0 values unscaled (p.v applies the block's
 * scale through its row weights) */
T256 __m256 ld8(int kind, const uint8_t *row, int i) {
    if (kind == BN_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)i)));
    if (kind == BN_Q8_0) {
        const uint8_t *b = row + (size_t)(i / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES + 2 + i % BN_Q8_0_BLOCK;
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b)));
    }
    return _mm256_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i));
}

/* 8 registers -> their 8 sums (out[k] = sum of v[k]), every sum by the same tree */
T256 __m256 sum8x8(const __m256 *v) {
    __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    __m256 a = _mm256_hadd_ps(h01, h23), b = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* 4 q rows by 2 keys a pass, hd % 8 == 0 */
T256 void scores_avx2(int kind, const float *q, int nq, int hd, const uint8_t *k, size_t ldk, int n, float scale,
                      float *out, size_t ldo) {
    __m256 sc = _mm256_set1_ps(scale);
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *qr[4];
        int nr = group_q(r0, nq, q, hd, qr);
        for (int j = 0; j < n; j += 2) {
            const uint8_t *k0 = k + (size_t)j * ldk, *k1 = k + (size_t)(j + 1 < n ? j + 1 : j) * ldk;
            prefetch_rows(k, ldk, j + KV_PREFETCH, 2, n);
            __m256 acc[8];
            for (int a = 0; a < 8; a++) acc[a] = _mm256_setzero_ps();
            for (int i = 0; i < hd; i += 8) {
                __m256 x0 = ld8(kind, k0, i), x1 = ld8(kind, k1, i);
                for (int r = 0; r < 4; r++) {
                    __m256 qv = _mm256_loadu_ps(qr[r] + i);
                    acc[2 * r] = _mm256_fmadd_ps(qv, x0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(qv, x1, acc[2 * r + 1]);
                }
            }
            float s[8]; /* s[2 * row + key] */
            _mm256_storeu_ps(s, _mm256_mul_ps(sum8x8(acc), sc));
            for (int r = 0; r < nr; r++) {
                out[(size_t)(r0 + r) * ldo + j] = s[2 * r];
                if (j + 1 < n) out[(size_t)(r0 + r) * ldo + j + 1] = s[2 * r + 1];
            }
        }
    }
}

/* 4 rows of o by 16 columns (then 8) in registers over a block of PV_KEYS_AVX2 value rows, then the next
 * columns over the same rows, hd % 8 == 0. q8_0 values: each row's weight p[r][j] times the value block's
 * scale once for the block's 32 columns (w), so that a value costs its widening and the multiply-adds only
 * (o += (p d) v, where f16 and f32 take o += p v); the next block's rows are requested along the passes. */
T256 void pv_avx2(int kind, float *o, int nq, int hd, const float *p, size_t ldp, const uint8_t *v, size_t ldv,
                  int n, const bn_ahead *ahead) {
    ahead_walk aw = ahead_begin(ahead, n); /* a step a key, in the first group of q rows */
    float w[4][PV_KEYS_AVX2];              /* q8_0: p[r][j] x the scale of row j's block at column c */
    const int passes = (hd + 15) / 16, per = (PV_KEYS_AVX2 + passes - 1) / passes; /* rows a column pass */
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *pr[4];
        float *orow[4];
        group_rows(r0, nq, p, ldp, o, hd, pr, orow);
        for (int jb = 0; jb < n; jb += PV_KEYS_AVX2) {
            int je = jb + PV_KEYS_AVX2 < n ? jb + PV_KEYS_AVX2 : n, c = 0;
            for (; c < hd; c += 16) {
                for (int j = jb + c / 16 * per; j < jb + (c / 16 + 1) * per && j < je; j++) {
                    prefetch_rows(v, ldv, j + KV_PREFETCH, 1, n);
                    if (r0 == 0) ahead_step(&aw);
                }
                const int wide = c + 16 <= hd; /* else the last 8 columns */
                if (kind == BN_Q8_0 && c % BN_Q8_0_BLOCK == 0) {
                    const uint8_t *vb = v + (size_t)(c / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES;
                    uint16_t h[PV_KEYS_AVX2] = {0};
                    for (int j = jb; j < je; j++) memcpy(&h[j - jb], vb + (size_t)j * ldv, 2);
                    for (int g = 0; g < je - jb; g += 8) {
                        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + g)));
                        if (je - jb - g >= 8)
                            for (int r = 0; r < 4; r++)
                                _mm256_storeu_ps(w[r] + g, _mm256_mul_ps(_mm256_loadu_ps(pr[r] + jb + g), d));
                        else { /* the call's last keys: p's row may end before 8 more */
                            float ds[8];
                            _mm256_storeu_ps(ds, d);
                            for (int r = 0; r < 4; r++)
                                for (int j = jb + g; j < je; j++) w[r][j - jb] = pr[r][j] * ds[j - jb - g];
                        }
                    }
                }
                __m256 acc[8];
                for (int r = 0; r < 4; r++) {
                    acc[2 * r] = _mm256_loadu_ps(orow[r] + c);
                    acc[2 * r + 1] = wide ? _mm256_loadu_ps(orow[r] + c + 8) : _mm256_setzero_ps();
                }
                for (int j = jb; j < je; j++) {
                    const uint8_t *vj = v + (size_t)j * ldv;
                    __m256 v0 = ld8(kind, vj, c), v1 = wide ? ld8(kind, vj, c + 8) : v0;
                    for (int r = 0; r < 4; r++) {
                        __m256 wr = _mm256_broadcast_ss(kind == BN_Q8_0 ? &w[r][j - jb] : pr[r] + j);
                        acc[2 * r] = _mm256_fmadd_ps(wr, v0, acc[2 * r]);
                        if (wide) acc[2 * r + 1] = _mm256_fmadd_ps(wr, v1, acc[2 * r + 1]);
                    }
                }
                for (int r = 3; r >= 0; r--) {
                    _mm256_storeu_ps(orow[r] + c, acc[2 * r]);
                    if (wide) _mm256_storeu_ps(orow[r] + c + 8, acc[2 * r + 1]);
                }
            }
        }
    }
}

KINDS(__attribute__((target("avx2,f16c,fma"))), avx2)

/* q8_0 tiles, 4 q rows by 8 keys (half a tile) a pass: |k| x (q with k's sign) by pmaddubsw (pairs at
 * most 2 x 127^2, no saturation), pairs to the key's 4-element sums by pmaddwd */
__attribute__((target("avx2,f16c,fma"))) static void scores_avx2_kt(const void *q, int nq, int hd, const void *k,
                                                                     size_t ldk, int n, float scale, float *out,
                                                                     size_t ldo) {
    const uint8_t *kt = (const uint8_t *)k;
    const int nb = q8_0_blocks(hd);
    const __m256i ones = _mm256_set1_epi16(1);
    kt_query z;
    for (int r0 = 0; r0 < nq; r0 += 4) {
        int nr = kt_query_rows((const uint8_t *)q, hd, nq, r0, scale, &z);
        for (int j = 0; j < n; j += 8) {
            const uint8_t *tile = kt + (size_t)(j / BN_KT) * BN_KT * ldk;
            int half = (j % BN_KT) / 8;
            /* 8 lines a block in the first half's loop below */
            const uint8_t *next = half ? NULL : prefetch_tile_tail(kt, ldk, j, n, nb);
            __m256 s[4];
            for (int r = 0; r < 4; r++) s[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *t = tile + (size_t)b * KT_BLK;
                __m256i acc[4];
                for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) {
                    if (next) __builtin_prefetch(next + 64 * (size_t)(8 * b + g), 0, 2);
                    __m256i kv = _mm256_loadu_si256((const __m256i *)(t + 32 + 64 * g + 32 * half));
                    __m256i ak = _mm256_sign_epi8(kv, kv);
                    for (int r = 0; r < 4; r++) {
                        __m256i qs = _mm256_sign_epi8(_mm256_set1_epi32(kt_q4(z.row[r], b, g)), kv);
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ak, qs), ones));
                    }
                }
                __m256 dk = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16 * half)));
                for (int r = 0; r < 4; r++)
                    s[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_mul_ps(dk, _mm256_set1_ps(z.dqs[r][b])),
                                           s[r]);
            }
            int m = n - j < 8 ? n - j : 8;
            for (int r = 0; r < nr; r++) {
                float v[8];
                _mm256_storeu_ps(v, s[r]);
                memcpy(out + (size_t)(r0 + r) * ldo + j, v, sizeof(float) * (size_t)m);
            }
        }
    }
}

__attribute__((target("avx,f16c"))) static void put_f16_f16c(const float *x, int n, void *dst) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    put_f16_scalar(x + i, n - i, (uint16_t *)dst + i);
}
#endif

#if defined(__aarch64__) && defined(__GNUC__)
#include <arm_neon.h>

/* ---- NEON (AArch64): 4 elements a register, widened 16 at a time (i % 16 == 0: within one q8_0 block) ---- */
static inline void ld16n(int kind, const uint8_t *row, int i, float32x4_t x[4]) {
    if (kind == BN_F16) {
        const float16x8_t a = vreinterpretq_f16_u8(vld1q_u8(row + 2 * (size_t)i));
        const float16x8_t b = vreinterpretq_f16_u8(vld1q_u8(row + 2 * (size_t)i + 16));
        x[0] = vcvt_f32_f16(vget_low_f16(a));
        x[1] = vcvt_high_f32_f16(a);
        x[2] = vcvt_f32_f16(vget_low_f16(b));
        x[3] = vcvt_high_f32_f16(b);
        return;
    }
    if (kind == BN_Q8_0) {
        const uint8_t *blk = row + (size_t)(i / BN_Q8_0_BLOCK) * BN_Q8_0_BYTES;
        const float d = f16_to_f32(blk);
        const int8x16_t q = vld1q_s8((const int8_t *)(blk + 2 + i % BN_Q8_0_BLOCK));
        const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_high_s8(q);
        x[0] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d);
        x[1] = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(lo)), d);
        x[2] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d);
        x[3] = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(hi)), d);
        return;
    }
    for (int t = 0; t < 4; t++) x[t] = vld1q_f32((const float *)(const void *)(row + 4 * ((size_t)i + 4 * t)));
}

/* 4 q rows by 4 keys a pass, hd % 16 == 0: 16 accumulators (lane l of one sums the elements l, l + 4, ..
 * in order), each key widened once for the 4 rows; a key batch short of 4 repeats its last key */
static inline void scores_neon(int kind, const float *q, int nq, int hd, const uint8_t *k, size_t ldk, int n,
                               float scale, float *out, size_t ldo) {
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *qr[4];
        int nr = group_q(r0, nq, q, hd, qr);
        for (int j = 0; j < n; j += 4) {
            const uint8_t *kj[4];
            group_keys(k, ldk, j, n, kj);
            float32x4_t acc[16];
            for (int a = 0; a < 16; a++) acc[a] = vdupq_n_f32(0.0f);
            for (int i = 0; i < hd; i += 16)
                for (int x = 0; x < 4; x++) {
                    float32x4_t kx[4];
                    ld16n(kind, kj[x], i, kx);
                    for (int r = 0; r < 4; r++)
                        for (int t = 0; t < 4; t++)
                            acc[4 * r + x] = vfmaq_f32(acc[4 * r + x], vld1q_f32(qr[r] + i + 4 * t), kx[t]);
                }
            for (int r = 0; r < nr; r++)
                for (int x = 0; x < 4 && j + x < n; x++) out[(size_t)(r0 + r) * ldo + j + x] = vaddvq_f32(acc[4 * r + x]) * scale;
        }
    }
}

/* 4 rows of o by 16 columns in registers while the keys' value rows stream past, hd % 16 == 0 */
static inline void pv_neon(int kind, float *o, int nq, int hd, const float *p, size_t ldp, const uint8_t *v,
                           size_t ldv, int n, const bn_ahead *ahead) {
    ahead_walk aw = ahead_begin(ahead, n); /* a step a key of the pass over columns 0 .. 15 */
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *pr[4];
        float *orow[4];
        group_rows(r0, nq, p, ldp, o, hd, pr, orow);
        for (int c = 0; c < hd; c += 16) {
            float32x4_t acc[16];
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 4; t++) acc[4 * r + t] = vld1q_f32(orow[r] + c + 4 * t);
            for (int j = 0; j < n; j++) {
                if (c == 0) {
                    prefetch_rows(v, ldv, j + KV_PREFETCH, 1, n);
                    if (r0 == 0) ahead_step(&aw);
                }
                float32x4_t x[4];
                ld16n(kind, v + (size_t)j * ldv, c, x);
                for (int r = 0; r < 4; r++) {
                    const float w = pr[r][j];
                    for (int t = 0; t < 4; t++) acc[4 * r + t] = vfmaq_n_f32(acc[4 * r + t], x[t], w);
                }
            }
            for (int r = 3; r >= 0; r--) /* row 0 last: a repeated row stores row 0's values */
                for (int t = 0; t < 4; t++) vst1q_f32(orow[r] + c + 4 * t, acc[4 * r + t]);
        }
    }
}

KINDS(, neon)

/* q8_0 tiles, 4 q rows by 4 keys (a quarter tile) a pass: int8 x int8 by smull/smull2, pairs added (at
 * most 2 x 127^2 in int16), then pairs of pairs into the key's int32 lane by sadalp */
static void scores_neon_kt(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float scale, float *out,
                           size_t ldo) {
    const uint8_t *kt = (const uint8_t *)k;
    const int nb = q8_0_blocks(hd);
    kt_query z;
    for (int r0 = 0; r0 < nq; r0 += 4) {
        int nr = kt_query_rows((const uint8_t *)q, hd, nq, r0, scale, &z);
        for (int j = 0; j < n; j += 4) {
            const uint8_t *tile = kt + (size_t)(j / BN_KT) * BN_KT * ldk;
            int quarter = (j % BN_KT) / 4;
            if (!quarter) prefetch_tile(kt, ldk, j, n);
            float32x4_t s[4];
            for (int r = 0; r < 4; r++) s[r] = vdupq_n_f32(0.0f);
            for (int b = 0; b < nb; b++) {
                const uint8_t *t = tile + (size_t)b * KT_BLK;
                int32x4_t acc[4];
                for (int r = 0; r < 4; r++) acc[r] = vdupq_n_s32(0);
                for (int g = 0; g < 8; g++) {
                    const int8x16_t kv = vld1q_s8((const int8_t *)(t + 32 + 64 * g + 16 * quarter));
                    for (int r = 0; r < 4; r++) {
                        const int8x16_t qv = vreinterpretq_s8_s32(vdupq_n_s32(kt_q4(z.row[r], b, g)));
                        int16x8_t pairs = vpaddq_s16(vmull_s8(vget_low_s8(kv), vget_low_s8(qv)), vmull_high_s8(kv, qv));
                        acc[r] = vpadalq_s16(acc[r], pairs);
                    }
                }
                const float32x4_t dk = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(t + 8 * quarter)));
                for (int r = 0; r < 4; r++) s[r] = vfmaq_f32(s[r], vcvtq_f32_s32(acc[r]), vmulq_n_f32(dk, z.dqs[r][b]));
            }
            int m = n - j < 4 ? n - j : 4;
            for (int r = 0; r < nr; r++) {
                float v[4];
                vst1q_f32(v, s[r]);
                memcpy(out + (size_t)(r0 + r) * ldo + j, v, sizeof(float) * (size_t)m);
            }
        }
    }
}

/* the f16 store, rounding to nearest even as the scalar cast */
static void put_f16_neon(const float *x, int n, void *dst) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16((uint16_t *)dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    put_f16_scalar(x + i, n - i, (uint16_t *)dst + i);
}
#endif

#define PICK(isa)                                                                                       \
    do {                                                                                                \
        *scores = kind == BN_F16 ? scores_##isa##_f16 : kind == BN_Q8_0 ? kt : scores_##isa##_f32;     \
        *pv = kind == BN_F16 ? pv_##isa##_f16 : kind == BN_Q8_0 ? pv_##isa##_q8_0 : pv_##isa##_f32;     \
    } while (0)

/* the kernels of a path for a KV kind and head_dim: AVX-512 on the AVX-512 paths when hd % 16 == 0, AVX2
 * on the x86 paths when hd % 8 == 0, NEON on the NEON path when hd % 16 == 0, else the scalar reference
 * (q8_0 keys' tile scores: the path's own for any hd, pick_kt). The store: F16C for f16 and AVX-512 for
 * q8_0 on the x86 paths that have them (the scalar f16 cast is a software routine without F16C, and
 * roundf a libm call), each bit-exact with the scalar one. */
/* the q8_0 tile scores of a path: they take whole padded blocks, so any hd */
static scores_fn pick_kt(int path) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (i2v_path_has_avx512vnni(path)) return scores_avx512_kt;
    if (path == I2V_PATH_AVX2 && __builtin_cpu_supports("f16c")) return scores_avx2_kt;
#endif
#if defined(__aarch64__) && defined(__GNUC__)
    if (path == I2V_PATH_NEON) return scores_neon_kt;
#endif
    (void)path;
    return scores_scalar_kt;
}

const char *bn_pick_kv(int path, int kind, int hd, scores_fn *scores, pv_fn *pv, kvput_fn *put) {
    const scores_fn kt = pick_kt(path);
    *put = kind == BN_F16 ? put_f16_scalar : kind == BN_Q8_0 ? put_q8_0_scalar : put_f32;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    int x86 = path == I2V_PATH_AVX2 || i2v_path_has_avx512vnni(path);
    if (x86 && kind == BN_F16 && __builtin_cpu_supports("f16c")) *put = put_f16_f16c;
    if (i2v_path_has_avx512vnni(path) && kind == BN_Q8_0) *put = put_q8_0_avx512;
    if (i2v_path_has_avx512vnni(path) && hd % 16 == 0) {
        PICK(avx512);
        return "avx512";
    }
    if (x86 && hd % 8 == 0 && __builtin_cpu_supports("f16c")) {
        PICK(avx2);
        return "avx2";
    }
#endif
#if defined(__aarch64__) && defined(__GNUC__)
    if (path == I2V_PATH_NEON && kind == BN_F16) *put = put_f16_neon;
    if (path == I2V_PATH_NEON && hd % 16 == 0) {
        PICK(neon);
        return "neon";
    }
#endif
    (void)path;
    PICK(scalar);
    return "scalar";
}
