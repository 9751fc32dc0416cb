/* The layer loop (bitnet_impl.h): embedding, per block RMSNorm -> int8 activations -> the ternary
 * projections (I2V kernels, once over all the step's rows, whatever sequences they belong to) ->
 * attention (attention.c, per sequence) -> sub-norm -> o, RMSNorm -> gate/up -> relu2 (or SiLU)
 * gating -> sub-norm -> down, the residuals, then the final norm and the head (head.c).
 *
 * Batch invariance: every float operation here is per row (per-row norms, per-row int8 quantization,
 * per-row dequantization of exact int32 sums: i2v_gemm_multi_f32 gives each row the same bits for
 * M = 1 and M = many, on every path, AMX included), so a row's values depend only on its own token,
 * position and sequence, never on the other rows of the step. */
#define _POSIX_C_SOURCE 200809L /* pread under -std=c11 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitnet_impl.h"

/* charge the time since tlap to phase ph (when profiling), and restart the clock */
#define LAP(ph)                                                                            \
    do {                                                                                   \
        if (m->profiling) {                                                                \
            int64_t t1_ = bn_now_ns();                                                     \
            m->prof[ph] += t1_ - tlap;                                                     \
            tlap = t1_;                                                                    \
        }                                                                                  \
    } while (0)

/* ---- ternary projection: y[t, :] = (q[t] . W^T) * (scale / s[t]) ---------------------------- */
/* projections of one quantized input in one pool run, each dequantized with its weight scale by the
 * part that made its sums: y_i = acc_i * (scale_i / s), float32 as the reference */
static int project(const bn_model *m, int n, const bn_linear *const *ps, const int8_t *q, size_t ldq,
                   const float *s, const int32_t *qsum, int T, float *const *ys, const size_t *ldys) {
    const uint8_t *w[I2V_MAX_MATS];
    int N[I2V_MAX_MATS];
    float scale[I2V_MAX_MATS];
    for (int i = 0; i < n; i++) {
        w[i] = ps[i]->w;
        N[i] = ps[i]->N;
        scale[i] = ps[i]->scale;
    }
    /* T5 reads whole 20-column blocks: q is zero up to ldq (bn_qpad), so claim the padded width and the
     * driver needs no padded copy */
    int K = m->wfmt == I2V_FMT_T5 ? (ps[0]->K + T5_COLS - 1) / T5_COLS * T5_COLS : ps[0]->K;
    return i2v_gemm_multi_f32_fmt(m->wfmt, q, ldq, qsum, s, T, K, n, w, N, scale, ys, ldys, m->path);
}

static int project1(const bn_model *m, const bn_linear *p, const int8_t *q, size_t ldq, const float *s,
                    const int32_t *qsum, int T, float *y, size_t ldy) {
    return project(m, 1, &p, q, ldq, s, qsum, T, &y, &ldy);
}

/* RMSNorm then per-token int8 quantization of T rows (in [T, ldin] -> xn [T, n] -> q [T, ldq]),
 * rows split over the pool when there are several. Before its norm a row can take the step that
 * made it, done here while the row is in cache and over the pool: NQ_ADD the residual (in += pre),
 * NQ_GATE the feed-forward's activation (in = act(in) * pre); pre has in's row stride. */
enum { NQ_PLAIN, NQ_ADD, NQ_GATE };
#define NQ_MAX_PARTS 16

typedef struct {
    const bn_model *m;
    float *in;
    const float *pre, *w;
    int pre_kind;
    size_t ldin, ldq;
    int n, T;
    float *xn, *s;
    int8_t *q;
    int32_t *qsum;
    int rc[NQ_MAX_PARTS];
} nq_task;

static void nq_part(void *ctx, int part, int np) {
    nq_task *a = (nq_task *)ctx;
    int t0 = (int)((long)a->T * part / np), t1 = (int)((long)a->T * (part + 1) / np);
    for (int t = t0; t < t1; t++) {
        float *row = a->in + (size_t)t * a->ldin;
        if (a->pre_kind == NQ_ADD) {
            bn_axpy(row, 1.0f, a->pre + (size_t)t * a->ldin, a->n);  /* row += pre: 1 * pre is exact */
        } else if (a->pre_kind == NQ_GATE) {
            bn_gate_act(row, a->pre + (size_t)t * a->ldin, (size_t)a->n, a->m->act);
        }
        bn_rmsnorm(a->m->dot, row, a->w, a->xn + (size_t)t * a->n, a->n, a->m->eps);
    }
    a->rc[part] = t1 > t0 ? i2v_quantize(a->xn + (size_t)t0 * a->n, (size_t)a->n, t1 - t0, a->n,
                                         a->q + (size_t)t0 * a->ldq, a->ldq, a->s + t0, a->qsum + t0, a->m->path)
                          : 0;
}

/* the parts of a pool run over T rows: one below 8 rows, else two a thread (NQ_MAX_PARTS at most) */
static int row_parts(int T) {
    int parts = T < 8 ? 1 : 2 * i2v_pool_threads();
    if (parts > NQ_MAX_PARTS) parts = NQ_MAX_PARTS;
    return parts > T ? T : parts;
}

static int norm_quant(const bn_model *m, float *in, size_t ldin, const float *pre, int pre_kind, const float *w,
                      int n, int T, float *xn, int8_t *q, size_t ldq, float *s, int32_t *qsum) {
    nq_task a = {m, in, pre, w, pre ? pre_kind : NQ_PLAIN, ldin, ldq, n, T, xn, s, q, qsum, {0}};
    int parts = row_parts(T);
    if (parts <= 1) {
        nq_part(&a, 0, 1);
        return a.rc[0];
    }
    i2v_pool_run(nq_part, &a, parts);
    for (int p = 0; p < parts; p++)
        if (a.rc[p]) return a.rc[p];
    return 0;
}

/* ---- the forward ------------------------------------------------------------------------------
 * T rows of nspan sequences (spans checked by the caller: consecutive rows, positions in range);
 * hidden_out [T, H] (one sequence) or logits [sum of n_out, V], the spans' last n_out rows in order */
static int forward(bn_model *m, const int32_t *tokens, int T, const bn_span *spans, int nspan, const bn_pool *pool,
                   float *hidden_out, float *logits) {
    int n_out = 0;
    for (int i = 0; i < nspan; i++) n_out += spans[i].n_out;
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->V) return -1;
    int H = m->H, I = m->I, hd = m->hd, qn = m->nh * hd, kvn = m->nkv * hd;
    int wide = I > H ? I : H;
    if (qn > wide) wide = qn;
    size_t kp = bn_qpad(wide);
    bn_attn_plan *plan = bn_attention_plan(m, spans, nspan, T, i2v_pool_threads());
    if (!plan) return -2;
    /* scratch, one allocation */
    size_t ld6 = (size_t)((H + 63) / 64) * 64; /* the 6-bit head's activation rows */
    size_t n_x = (size_t)T * H, n_xn = (size_t)T * (wide > qn + 2 * kvn ? wide : qn + 2 * kvn), n_q8 = (size_t)T * (kp > ld6 ? kp : ld6);
    size_t n_att = (size_t)T * (qn > H ? qn : H), n_g = (size_t)T * I;
    size_t n_work = bn_attention_scratch(m, plan);
    size_t n_ax = bn_head_needs_ax(m) ? (size_t)n_out * bn_kpad(H) : 0;
    size_t bytes = 4 * (n_x + n_xn + n_att + n_g + 2 * (size_t)T + n_work) + n_q8 + n_ax +
                   64 * 11;
    char *buf = bn_scratch(m, bytes);
    if (!buf) {
        bn_attention_plan_free(plan);
        return -2;
    }
    char *p = buf;
#define TAKE(T_, n_) ((T_ *)(p = (char *)(((uintptr_t)(p) + 63) & ~(uintptr_t)63), p += (n_) * sizeof(T_), p - (n_) * sizeof(T_)))
    /* xn holds each norm's output only until it is quantized into q8; then it takes q|k|v (attention
     * reads q from it in place) and the up projection */
    float *x = TAKE(float, n_x), *xn = TAKE(float, n_xn), *att = TAKE(float, n_att);
    float *g = TAKE(float, n_g), *s = TAKE(float, T), *qkv = xn, *u = xn;
    float *work = TAKE(float, n_work);
    int32_t *qsum = TAKE(int32_t, T);
    int8_t *q8 = TAKE(int8_t, n_q8), *ax = n_ax ? TAKE(int8_t, n_ax) : NULL;
#undef TAKE
    int rc = 0;
    int64_t tlap = m->profiling ? bn_now_ns() : 0;
    /* embedding: rows from the mapping, or read with pread (bf16 rows by way of xn, unused yet) */
    for (int t = 0; t < T && !rc; t++) {
        float *xt = x + (size_t)t * H;
        size_t row = (size_t)tokens[t] * H;
        if (m->embed_fd >= 0) {
            size_t n = (m->embed_kind == BN_F32 ? 4 : 2) * (size_t)H, got = 0;
            char *dst = m->embed_kind == BN_F32 ? (char *)xt : (char *)xn;
            while (got < n) {
                ssize_t r = pread(m->embed_fd, dst + got, n - got, (off_t)(m->embed_offset + row * (n / H) + got));
                if (r <= 0) break;
                got += (size_t)r;
            }
            if (got < n) rc = -3;
            else if (m->embed_kind == BN_BF16)
                for (int i = 0; i < H; i++) xt[i] = bn_bf16_to_f32(((const uint16_t *)dst)[i]);
        } else if (m->embed_kind == BN_F32)
            memcpy(xt, (const float *)m->embed + row, sizeof(float) * H);
        else
            for (int i = 0; i < H; i++) xt[i] = bn_bf16_to_f32(((const uint16_t *)m->embed)[row + i]);
    }
    size_t ldqkv = (size_t)(qn + 2 * kvn);
    LAP(BN_PROF_EMBED);
    const float *pending = NULL;  /* the last down projection's output, not yet added into x */
    for (int l = 0; l < m->L && !rc; l++) {
        const bn_layer *y = &m->layers[l];
        /* attention */
        if ((rc = norm_quant(m, x, (size_t)H, pending, NQ_ADD, y->attn_norm, H, T, xn, q8, bn_qpad(H), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        {
            const bn_linear *ps[3] = {&y->proj[P_Q], &y->proj[P_K], &y->proj[P_V]};
            float *ys[3] = {qkv, qkv + qn, qkv + qn + kvn};
            size_t ld[3] = {ldqkv, ldqkv, ldqkv};
            if ((rc = project(m, 3, ps, q8, bn_qpad(H), s, qsum, T, ys, ld))) break;
        }
        LAP(BN_PROF_QKV);
        bn_rope_store(m, l, pool, spans, nspan, qkv, T, row_parts(T));
        LAP(BN_PROF_ROPE_KV);
        bn_attention(m, l, pool, plan, qkv, ldqkv, att, work);
        LAP(BN_PROF_ATTN);
        if ((rc = norm_quant(m, att, (size_t)qn, NULL, NQ_PLAIN, y->attn_sub_norm, qn, T, xn, q8, bn_qpad(qn), s, qsum)))
            break;
        LAP(BN_PROF_NORM_QUANT);
        if ((rc = project1(m, &y->proj[P_O], q8, bn_qpad(qn), s, qsum, T, att, (size_t)H))) break;
        LAP(BN_PROF_O);
        /* feed-forward: the residual x += o-projection first */
        if ((rc = norm_quant(m, x, (size_t)H, att, NQ_ADD, y->ffn_norm, H, T, xn, q8, bn_qpad(H), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        {
            const bn_linear *ps[2] = {&y->proj[P_GATE], &y->proj[P_UP]};
            float *ys[2] = {g, u};
            size_t ld[2] = {(size_t)I, (size_t)I};
            if ((rc = project(m, 2, ps, q8, bn_qpad(H), s, qsum, T, ys, ld))) break;
        }
        LAP(BN_PROF_GATE_UP);
        /* u is xn: row t of the norm's output overwrites row t of u, just read for that row's gate
         * (same stride I), so no part writes a row another part still reads */
        if ((rc = norm_quant(m, g, (size_t)I, u, NQ_GATE, y->ffn_sub_norm, I, T, xn, q8, bn_qpad(I), s, qsum))) break;
        LAP(BN_PROF_NORM_QUANT);
        if ((rc = project1(m, &y->proj[P_DOWN], q8, bn_qpad(I), s, qsum, T, att, (size_t)H))) break;
        LAP(BN_PROF_DOWN);
        pending = att;
    }
    if (!rc && pending) {
        for (size_t i = 0; i < n_x; i++) x[i] += pending[i];
        LAP(BN_PROF_NORM_QUANT);
    }
    if (!rc && hidden_out)
        for (int t = 0; t < T; t++)
            bn_rmsnorm(m->dot, x + (size_t)t * H, m->final_norm, hidden_out + (size_t)t * H, H, m->eps);
    if (!rc && logits && n_out > 0) {
        float *h = xn;  /* the final norm of the rows wanted, [n_out, H] */
        for (int i = 0; i < nspan; i++)
            for (int t = spans[i].row0 + spans[i].n - spans[i].n_out; t < spans[i].row0 + spans[i].n; t++, h += H)
                bn_rmsnorm(m->dot, x + (size_t)t * H, m->final_norm, h, H, m->eps);
        rc = bn_head(m, xn, n_out, q8, s, qsum, ax, logits);
        LAP(BN_PROF_HEAD);
    }
    bn_attention_plan_free(plan);
    return rc;
}

int bn_forward(const bn_model *m, const int32_t *tokens, int T, int pos, float *logits, int n_out) {
    if (T <= 0 || pos < 0 || pos > m->max_len - T || n_out < 0 || n_out > T) return -1;
    bn_span sp = {0, T, pos, n_out, m->own_blocks};
    bn_pool own = {m->kv, BN_KV_BLOCK, bn_kv_blocks(m->max_len)};
    return forward((bn_model *)m, tokens, T, &sp, 1, &own, NULL, logits);
}

int bn_forward_hidden(const bn_model *m, const int32_t *tokens, int T, int pos, float *hidden) {
    if (T <= 0 || pos < 0 || pos > m->max_len - T) return -1;
    bn_span sp = {0, T, pos, 0, m->own_blocks};
    bn_pool own = {m->kv, BN_KV_BLOCK, bn_kv_blocks(m->max_len)};
    return forward((bn_model *)m, tokens, T, &sp, 1, &own, hidden, NULL);
}

int bn_forward_paged(const bn_model *m, const int32_t *tokens, const int64_t *seqs, int nseq, void *pool,
                     int block_size, int n_blocks, float *logits) {
    if (nseq <= 0 || !pool || block_size <= 0 || n_blocks <= 0) return -1;
    if (m->kv_kind == BN_Q8_0 && block_size % BN_KT) return -1; /* q8_0 keys: whole tiles a block */
    bn_span *spans = (bn_span *)malloc((size_t)nseq * sizeof *spans);
    if (!spans) return -2;
    int T = 0, rc = 0;
    for (int i = 0; i < nseq && !rc; i++) {
        const int64_t *q = seqs + (size_t)BN_NS * i;
        int64_t n = q[BN_S_N], pos = q[BN_S_POS], n_out = q[BN_S_NOUT];
        const int32_t *blocks = (const int32_t *)(uintptr_t)q[BN_S_BLOCKS];
        if (n <= 0 || pos < 0 || pos > m->max_len - n || n_out < 0 || n_out > n || !blocks || n > INT_MAX - T) {
            rc = -1;
            break;
        }
        for (int64_t b = 0; b < (pos + n + block_size - 1) / block_size; b++)
            if (blocks[b] < 0 || blocks[b] >= n_blocks) rc = -1;
        spans[i] = (bn_span){T, (int)n, (int)pos, (int)n_out, blocks};
        T += (int)n;
    }
    bn_pool p = {(char *)pool, block_size, n_blocks};
    if (!rc) rc = forward((bn_model *)m, tokens, T, spans, nseq, &p, NULL, logits);
    free(spans);
    return rc;
}
