/* The whole BitNet b1.58 forward pass in C, on the I2V ternary kernels (i2v.h).
 *
 * Plain C on raw pointers: Python describes a model once (bn_model_new) with pointers into arrays it
 * keeps alive (memory-mapped weights, the KV cache), then calls bn_forward per step. No torch.
 * bn_forward_paged runs many sequences in one step over the same weights, their keys and values in a
 * paged pool (engine/batch.py). The implementation is split by concern (bitnet_impl.h).
 *
 * Descriptor layout (all int64; pointers as integers, floats as float64 in a second array):
 *   ints[0..BN_NI)    config and global pointers, indexed by the BN_I_* names below
 *   ints[BN_NI + 11*l + j]   layer l, j = BN_L_* below
 *   flts[0] = rms_norm_eps, flts[1 + 7*l + j] = weight scale of projection j (q k v o gate up down)
 */
#ifndef BITLM_BITNET_H
#define BITLM_BITNET_H

#include <stdint.h>

enum {
    BN_I_LAYERS, BN_I_HIDDEN, BN_I_INTER, BN_I_HEADS, BN_I_KV_HEADS, BN_I_HEAD_DIM, BN_I_VOCAB,
    BN_I_MAX_LEN, BN_I_ACT,             /* 0 relu2, 1 silu */
    BN_I_ROPE_COS, BN_I_ROPE_SIN,       /* float32 [max_len, head_dim] */
    BN_I_FINAL_NORM,                    /* float32 [hidden] */
    BN_I_EMBED, BN_I_EMBED_KIND,        /* [vocab, hidden], kind BN_F32 or BN_BF16 */
    BN_I_HEAD_KIND,                     /* BN_F32, BN_BF16 (rows as stored), BN_Q8 (int8 rows) or
                                           BN_Q6 (formats/q6.py rows, float32 [vocab] scales) */
    BN_I_HEAD, BN_I_HEAD_SCALE, BN_I_HEAD_ROWSUM, /* rows [vocab, hidden]; for BN_Q8: float32 [vocab]
                                                     row scales and int32 [vocab] row sums */
    BN_I_PATH,                          /* kernel path, -1 = best */
    BN_I_KV_KIND,                       /* KV cache element: BN_F32, BN_F16 or BN_Q8_0 (formats/q8_0.py: a row of
                                           head_dim values is ceil(head_dim / 32) blocks of 34 bytes) */
    BN_I_EMBED_FD, BN_I_EMBED_OFFSET,   /* -1, or a file descriptor to read embedding rows from with
                                           pread, row 0 at byte BN_I_EMBED_OFFSET (the rows then stay
                                           in the page cache instead of this process's resident set) */
    BN_I_WFMT,                          /* the projections' packed format: I2V_FMT_I2V (2 bits) or I2V_FMT_T5
                                           (1.6 bits), i2v.h; every projection of the model in that format */
    BN_I_KV_CACHE,                      /* bn_forward's KV cache: ceil(max_len / BN_KV_BLOCK) blocks of BN_KV_BLOCK
                                           positions, each laid out as a paged pool's block ([layers][2]
                                           [kv_heads][BN_KV_BLOCK][row], rows of head_dim BN_I_KV_KIND
                                           elements); block b holds positions b * BN_KV_BLOCK ..
                                           (bn_forward_paged uses its pool instead) */
    BN_NI
};
enum { BN_L_ATTN_NORM, BN_L_FFN_NORM, BN_L_ATTN_SUB_NORM, BN_L_FFN_SUB_NORM,
       BN_L_Q, BN_L_K, BN_L_V, BN_L_O, BN_L_GATE, BN_L_UP, BN_L_DOWN, /* packed weights (BN_I_WFMT) */
       BN_NL };
/* Positions per block of bn_forward's own cache (BN_I_KV_CACHE): the memory a sequence uses grows with
 * its positions, all layers' rows of a block together, so the cache can live on huge pages
 * (engine/native.py) without a first token making the whole cache resident; and a block is as long as an
 * attention chunk (ATT_CHUNK), so each chunk's keys are one contiguous run. A multiple of 16 (q8_0 key
 * tiles) */
#define BN_KV_BLOCK 256

enum { BN_F32 = 0, BN_BF16 = 1, BN_Q8 = 2, BN_F16 = 3, BN_Q6 = 4, BN_Q8_0 = 5 };

typedef struct bn_model bn_model;

/* A model from its descriptor, or NULL (bad sizes or out of memory). */
bn_model *bn_model_new(const int64_t *ints, int nints, const double *flts, int nflts);
void bn_model_free(bn_model *m);

/* Run T tokens at positions pos .. pos+T-1 (their keys and values are written to the cache);
 * logits float32 [n_out, vocab] of the last n_out positions (n_out in 0..T). Returns 0, -1 for bad
 * arguments (positions past max_len, token ids out of range), -2 when out of memory, -3 when an
 * embedding row could not be read from BN_I_EMBED_FD. */
int bn_forward(const bn_model *m, const int32_t *tokens, int T, int pos, float *logits, int n_out);

/* Per-phase wall time, for the decode breakdown: phases BN_PROF_*, nanoseconds summed over calls
 * since the last reset. Timing costs ~20 ns per phase boundary; off unless enabled. */
enum { BN_PROF_EMBED, BN_PROF_NORM_QUANT, BN_PROF_QKV, BN_PROF_ROPE_KV, BN_PROF_ATTN, BN_PROF_O,
       BN_PROF_GATE_UP, BN_PROF_DOWN, BN_PROF_HEAD, BN_NPROF };
void bn_profile(bn_model *m, int enable, int64_t *out /* [BN_NPROF] or NULL */, int reset);

/* Final hidden states instead of logits: float32 [T, hidden] (for tests and embeddings). */
int bn_forward_hidden(const bn_model *m, const int32_t *tokens, int T, int pos, float *hidden);

/* Many sequences in one step. The step's tokens are the rows of nseq sequences one after another,
 * sequence i described by seqs[BN_NS * i + BN_S_*]: its n rows (>= 1) go at positions pos .. pos+n-1,
 * logits float32 [V] are written for its last n_out rows (0..n; all sequences' rows in order,
 * [sum of n_out, V] in all), and its keys and values live in the pool blocks listed by its block
 * table: int32 block ids, entry b holding positions b*block_size .. (b+1)*block_size - 1, entries
 * for positions 0 .. pos+n-1. The pool: n_blocks blocks of block_size positions, each
 * [layers][2 (keys, values)][kv_heads][block_size] rows of head_dim BN_I_KV_KIND elements, one after
 * another (q8_0 keys: in tiles of 16 positions, formats/q8_0.py, so block_size % 16 == 0 then). The
 * projections run once over all rows; attention per sequence over its own blocks. A row's logits do not
 * depend on the other rows of the step, bit for bit, and equal bn_forward's for the same tokens and
 * positions. Returns as bn_forward (-1 also for a block id out of range, or a q8_0 block_size that is
 * not a multiple of 16). */
enum { BN_S_N, BN_S_POS, BN_S_NOUT, BN_S_BLOCKS /* pointer to int32 ids */, BN_NS };
int bn_forward_paged(const bn_model *m, const int32_t *tokens, const int64_t *seqs, int nseq, void *pool,
                     int block_size, int n_blocks, float *logits);

#endif
