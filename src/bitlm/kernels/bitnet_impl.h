/* Internal to the forward pass (bitnet.h is the public header): the model struct and what its files
 * share. The forward is split by concern:
 *   bitnet.c     the model from its descriptor, its scratch memory, the profile counters
 *   vecops.c     float loops per instruction set (dot products, norms, softmax pieces)
 *   kvops.c      attention's loops over the KV cache per element type (f32, f16, q8_0) and instruction set
 *   forward.c    the layer loop: embedding, norms + int8 quantization, the ternary projections, residuals
 *   attention.c  RoPE, the KV store and attention, over the model's own cache or a paged pool
 *   head.c       the output head (float, int8 or 6-bit rows)
 */
#ifndef BITLM_BITNET_IMPL_H
#define BITLM_BITNET_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bitnet.h"
#include "i2v.h"

typedef float (*dot_fn)(const float *, const float *, int);
/* out[r * ldo] = scale * (q_r . k) for the nq rows q_r = q + r * n (the q heads of one kv head) */
/* softmax numerators in place, s[j] = exp(s[j] - mx) for j < n; returns their sum */
typedef float (*expsum_fn)(float *s, int n, float mx);
typedef float (*rowmax_fn)(const float *s, int n); /* max of s[0 .. n), n >= 1 */
/* attention over a run of n keys of one kv head, rows of the KV element kind (kvops.c):
 * scores: out[r * ldo + j] = scale * (q_r . k_j), q_r = q + r * hd floats (r < nq), k_j = k + j * ldk bytes;
 *         over q8_0 keys, which the cache holds in tiles of BN_KT keys (kvops.c), k is the first key's tile
 *         (a key j % BN_KT == 0), ldk a row's bytes, and q_r = q + r * bn_kt_query_bytes(hd) bytes is q's
 *         head r quantized to q8_0 (bn_kt_query): the integer dot of llama.cpp
 * pv:     o_r += sum over j < n of p[r * ldp + j] * v_j, v_j = v + j * ldv bytes. While it runs, the
 *         SIMD kernels also request into L2 the 64-byte lines that hold the bytes of `ahead`, L / n of
 *         them a key, spread evenly over the call (the scalar reference requests nothing): attention.c
 *         gives the next unit's keys, so that the scores after it read them from cache. Requests only:
 *         the results are the same for any ahead.
 * Each o element takes its n terms one after another in j order, so a call over keys 0..n equals two
 * calls over 0..a and a..n bit for bit (attention relies on it to follow a paged cache's blocks; over q8_0
 * keys a % BN_KT == 0). */
typedef void (*scores_fn)(const void *q, int nq, int hd, const void *k, size_t ldk, int n, float scale, float *out,
                          size_t ldo);
typedef struct {
    const uint8_t *p; /* any alignment; NULL or bytes = 0: nothing */
    size_t bytes;
} bn_ahead;
typedef void (*pv_fn)(float *o, int nq, int hd, const float *p, size_t ldp, const void *v, size_t ldv, int n,
                      const bn_ahead *ahead);
/* one cache row of n values from float32 x (f32 copied, f16 rounded to nearest even, q8_0 quantized) */
typedef void (*kvput_fn)(const float *x, int n, void *dst);

typedef struct {
    const uint8_t *w;
    int N, K;
    float scale;
} bn_linear;

typedef struct {
    const float *attn_norm, *ffn_norm, *attn_sub_norm, *ffn_sub_norm;
    bn_linear proj[7]; /* q k v o gate up down */
} bn_layer;

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

struct bn_model {
    int L, H, I, nh, nkv, hd, V, max_len, act, embed_kind, head_kind, path, kv_kind, embed_fd;
    size_t kv_row; /* bytes of one cached row of head_dim elements (bn_kv_row_bytes) */
    int wfmt; /* the projections' packed format, I2V_FMT_* */
    int64_t embed_offset;
    float eps;
    const float *cos, *sin, *final_norm;
    const void *embed, *head;
    const float *head_scale;
    const int32_t *head_rowsum;
    char *kv;            /* the own cache (bitnet.h BN_I_KV_CACHE) */
    int32_t *own_blocks; /* its block table: 0, 1, .. bn_kv_blocks(max_len) - 1 */
    bn_layer *layers;
    dot_fn dot;
    expsum_fn expsum;
    rowmax_fn rowmax;
    scores_fn scores;
    pv_fn pv;
    kvput_fn kv_put;
    int profiling;
    int64_t prof[BN_NPROF];
    char *scratch; /* the forward's scratch, kept between calls (grown when a call needs more) */
    size_t scratch_bytes;
};

/* ---- bitnet.c ---- */
char *bn_scratch(bn_model *m, size_t bytes); /* at least `bytes` of scratch, or NULL */
int64_t bn_now_ns(void);

/* ---- vecops.c: picked once per model from its kernel path ---- */
dot_fn bn_pick_dot(int path);
expsum_fn bn_pick_expsum(int path);
rowmax_fn bn_pick_rowmax(int path);
void bn_rmsnorm(dot_fn dot, const float *x, const float *w, float *out, int n, float eps);
void bn_axpy(float *y, float a, const float *x, int n);
void bn_gate_act(float *g, const float *u, size_t n, int act); /* g = act(g) * u */
float bn_dot_bf16(const uint16_t *a, const float *b, int n);

/* ---- kvops.c: the KV cache's rows ---- */
#define BN_Q8_0_BLOCK 32 /* q8_0 (formats/q8_0.py): 32 values as an f16 scale and 32 int8 */
#define BN_Q8_0_BYTES 34
/* q8_0 keys are cached in tiles of BN_KT keys, lanes = keys (formats/q8_0.py tile_keys): for each q8_0
 * block of the row, the BN_KT keys' f16 scales, then 8 groups of 4 elements, each as BN_KT keys x 4 int8.
 * A tile takes the bytes of its BN_KT rows, from where its first key's row would start. */
#define BN_KT 16
size_t bn_kv_row_bytes(int kind, int hd);
void bn_q8_0_row(const float *x, int n, uint8_t *dst);
/* a q8_0 row (bn_q8_0_row, ld bytes) into its lane of a tile of BN_KT keys */
void bn_kt_put(const uint8_t *row, size_t ld, uint8_t *tile, int lane);
/* q's head x [hd] as the tile scores take it (bn_kt_query_bytes(hd) bytes): its q8_0 row by put (the
 * cache's quantizer), then each block's sum of int8 as int32 */
size_t bn_kt_query_bytes(int hd);
void bn_kt_query(kvput_fn put, const float *x, int hd, uint8_t *dst);
/* blocks of BN_KV_BLOCK positions in the model's own cache (bitnet.h) */
_Static_assert(BN_KV_BLOCK % BN_KT == 0, "the own cache's blocks hold whole q8_0 key tiles");
static inline int bn_kv_blocks(int max_len) { return (max_len + BN_KV_BLOCK - 1) / BN_KV_BLOCK; }
/* the attention kernels and the row store of a path for a KV kind and head_dim; returns the kernels'
 * instruction set's name */
const char *bn_pick_kv(int path, int kind, int hd, scores_fn *scores, pv_fn *pv, kvput_fn *put);

static inline float bn_bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- the rows of one step, by sequence ----
 * A step's T rows are the rows of one or more sequences, each sequence's rows consecutive and at
 * consecutive positions. The sequences' keys and values live in a paged pool: the model's own cache (one
 * sequence: bn_forward; blocks in order) or the caller's (bn_forward_paged). */
typedef struct {
    int row0, n;           /* rows row0 .. row0+n-1 of the step */
    int pos;               /* the position of row row0 */
    int n_out;             /* logits for the last n_out rows */
    const int32_t *blocks; /* the block ids of positions 0, bs, 2 bs, ... */
} bn_span;

typedef struct {
    char *base;  /* block b at base + b * block_bytes */
    int bs;      /* positions per block (BN_KV_BLOCK for the model's own cache) */
    int n_blocks;
} bn_pool;

/* the row of kv head h at position p of sequence sp in layer l, kv 0 = keys, 1 = values: a pool holds
 * a block as [layers][2][kv_heads][bs][head_dim] elements. q8_0 keys: the tile of p is the row of p
 * rounded down to a multiple of BN_KT (a pool's bs is one) */
static inline void *bn_kv_row(const bn_model *m, const bn_pool *pool, const bn_span *sp, int l, int kv, int h, int p) {
    size_t bs = (size_t)pool->bs, b = (size_t)sp->blocks[p / pool->bs];
    size_t row = (((b * m->L + l) * 2 + kv) * m->nkv + h) * bs + (size_t)(p % pool->bs);
    return pool->base + row * m->kv_row;
}

/* ---- attention.c ---- */
/* Keys per chunk: a row's keys are cut at fixed multiples of ATT_CHUNK counted from position 0, each
 * chunk's softmax taken alone, then the chunks merged in order (split-K, as flash-decoding): the chunks
 * of one row can run on different threads while the row's arithmetic stays fixed by its position. */
#define ATT_CHUNK 256
/* rows of K or V requested before the loop that reads a chunk starts (attention.c prefetch_run) */
#define ATT_PREFETCH 16
/* RoPE on rows' q and k heads of qkv [T, ldqkv = q | k | v], then k and v into each sequence's cache */
void bn_rope_store(const bn_model *m, int l, const bn_pool *pool, const bn_span *spans, int nspan, float *qkv, int T,
                   int nparts);
/* The step's attention work, the same for every layer: units of (sequence, kv head, chunk, rows), cut
 * into parts by cost. bn_attention_plan fills it (NULL out of memory), bn_attention_plan_free frees it. */
typedef struct bn_attn_plan bn_attn_plan;
bn_attn_plan *bn_attention_plan(const bn_model *m, const bn_span *spans, int nspan, int T, int threads);
void bn_attention_plan_free(bn_attn_plan *plan);
size_t bn_attention_scratch(const bn_model *m, const bn_attn_plan *plan); /* floats of scratch it needs */
/* attention of every row over its own sequence's keys: out [T, nh * hd]; work: bn_attention_scratch floats */
void bn_attention(const bn_model *m, int l, const bn_pool *pool, const bn_attn_plan *plan, const float *qkv,
                  size_t ldqkv, float *out, float *work);

/* ---- head.c ---- */
/* logits [n, V] of the n normed rows h [n, H]; q8 [n, max(kpad(H), 64-padded H)], s [n], qsum [n] and,
 * for the int8 head on AVX2, ax [n, kpad(H)] are scratch (bn_head_needs_ax). h may be overwritten. */
int bn_head_needs_ax(const bn_model *m);
int bn_head(const bn_model *m, const float *h, int n, int8_t *q8, float *s, int32_t *qsum, int8_t *ax,
            float *logits);

static inline size_t bn_kpad(int k) { return (size_t)((k + I2V_COLS - 1) / I2V_COLS) * I2V_COLS; }
/* the row stride of a projection's quantized input: whole blocks of either weight format (16 columns for
 * I2V, 20 for T5; 80 = lcm), zeros past K written by the quantizer */
static inline size_t bn_qpad(int k) { return (size_t)((k + 79) / 80) * 80; }

#endif
