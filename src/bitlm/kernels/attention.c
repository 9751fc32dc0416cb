/* RoPE, the KV store and attention (bitnet_impl.h), for the rows of one or many sequences: each row
 * attends to its own sequence's keys only, in the model's own cache (one sequence) or in the blocks
 * of a paged pool. Every row's arithmetic depends only on its sequence and position, never on what
 * else is in the step: a row gives the same bits alone or among others (batch invariance). */
#include <math.h>
#include <string.h>

#include "bitnet_impl.h"

static void rope(float *v, const float *cos, const float *sin, int hd) {
    int h2 = hd / 2;
    for (int i = 0; i < h2; i++) {
        float x1 = v[i], x2 = v[i + h2];
        v[i] = x1 * cos[i] - x2 * sin[i];
        v[i + h2] = x2 * cos[i + h2] + x1 * sin[i + h2];
    }
}

/* the span holding row t, searching forward from span s (rows are visited in increasing order) */
static int span_at(const bn_span *spans, int s, int t) {
    while (t >= spans[s].row0 + spans[s].n) s++;
    return s;
}

/* RoPE on the q and k heads of rows t0 .. t1 of qkv [T, q | k | v], and k, v into their sequence's
 * cache at the rows' positions */
typedef struct {
    const bn_model *m;
    int l;
    const bn_pool *pool;
    const bn_span *spans;
    int nspan;
    float *qkv;
    int T;
} rope_task;

static void rope_part(void *ctx, int part, int np) {
    const rope_task *a = (const rope_task *)ctx;
    const bn_model *m = a->m;
    int hd = m->hd, qn = m->nh * hd, kvn = m->nkv * hd;
    size_t ldqkv = (size_t)(qn + 2 * kvn);
    int t0 = (int)((long)a->T * part / np), t1 = (int)((long)a->T * (part + 1) / np);
    int s = 0;
    for (int t = t0; t < t1; t++) {
        const bn_span *sp = &a->spans[s = span_at(a->spans, s, t)];
        int ps = sp->pos + (t - sp->row0);
        float *qt = a->qkv + (size_t)t * ldqkv, *kt = qt + qn, *vt = kt + kvn;
        const float *c = m->cos + (size_t)ps * hd, *sn = m->sin + (size_t)ps * hd;
        for (int h = 0; h < m->nh; h++) rope(qt + (size_t)h * hd, c, sn, hd);
        for (int h = 0; h < m->nkv; h++) {
            rope(kt + (size_t)h * hd, c, sn, hd);
            void *kd = bn_kv_row(m, a->pool, sp, a->l, 0, h, ps), *vd = bn_kv_row(m, a->pool, sp, a->l, 1, h, ps);
            if (m->kv_f16) {
                m->f2h(kt + (size_t)h * hd, kd, hd);
                m->f2h(vt + (size_t)h * hd, vd, hd);
            } else {
                memcpy(kd, kt + (size_t)h * hd, sizeof(float) * hd);
                memcpy(vd, vt + (size_t)h * hd, sizeof(float) * hd);
            }
        }
    }
}

void bn_rope_store(const bn_model *m, int l, const bn_pool *pool, const bn_span *spans, int nspan, float *qkv,
                   int T, int nparts) {
    rope_task rt = {m, l, pool, spans, nspan, qkv, T};
    i2v_pool_run(rope_part, &rt, nparts);
}

/* ---- attention: one part = a range of (kv head, row) pairs -----------------------------------
 * The q heads that share a kv head (grouped-query attention) are done together, over the keys in
 * blocks of ATT_BLK with an online softmax (a running maximum and sum per q row; the output rows are
 * rescaled when the maximum grows). The blocks start at key 0 whatever the row, so a row's reduction
 * order is fixed by its position alone. A block of keys and values is converted from f16 once per
 * part and used by all of the part's rows of that sequence, so scratch is a block per part whatever
 * the context length. In a paged pool a block of ATT_BLK keys spans several cache blocks: its keys are
 * taken in runs, each contiguous in memory; pv_fn sums its keys in order, so runs give the same bits
 * as one contiguous block. */
typedef struct {
    const bn_model *m;
    int l;
    const bn_pool *pool;
    const bn_span *spans;
    int nspan;
    const float *q; /* [T, ldq]: the q heads first in each row */
    size_t ldq;
    float *out;     /* [T, nh*hd], accumulated in place */
    float *stat;    /* [T, nh, 2]: running maximum and sum */
    float *work;    /* [nparts, ldwork] */
    size_t ldwork;
    int T;
} attn_task;

size_t bn_attention_ldwork(const bn_model *m) {
    return (size_t)(m->nh / m->nkv) * ATT_BLK + (m->kv_f16 ? 2 * (size_t)ATT_BLK * m->hd : 0);
}

typedef struct {
    int j, n;           /* keys j .. j+n-1 of the block (0-based in the block) */
    const float *k, *v; /* their rows, head_dim apart */
} kv_run;

/* rows ta .. tb (exclusive; rows of the step, all in sequence sp) of kv head kvh */
static void attend_span(const attn_task *a, const bn_span *sp, int kvh, int ta, int tb, float *work) {
    const bn_model *m = a->m;
    int group = m->nh / m->nkv, hd = m->hd, qn = m->nh * hd;
    float scale = 1.0f / sqrtf((float)hd);
    float *sc = work, *kb = work + (size_t)group * ATT_BLK, *vb = kb + (size_t)ATT_BLK * hd;
    int bs = a->pool->base ? a->pool->bs : m->max_len; /* positions contiguous in memory */
    kv_run run[ATT_BLK + 1];
    for (int t = ta; t < tb; t++) {
        memset(a->out + (size_t)t * qn + (size_t)kvh * group * hd, 0, sizeof(float) * group * hd);
        for (int r = 0; r < group; r++) {
            a->stat[((size_t)t * m->nh + kvh * group + r) * 2] = -INFINITY;
            a->stat[((size_t)t * m->nh + kvh * group + r) * 2 + 1] = 0.0f;
        }
    }
    int first = sp->pos + (ta - sp->row0), n_all = first + (tb - ta); /* keys the last row sees */
    for (int j0 = 0; j0 < n_all; j0 += ATT_BLK) {
        int nb = n_all - j0 < ATT_BLK ? n_all - j0 : ATT_BLK, nrun = 0;
        for (int j = j0; j < j0 + nb; nrun++) {
            int e = (j / bs + 1) * bs;
            if (e > j0 + nb) e = j0 + nb;
            kv_run r = {j - j0, e - j, (const float *)bn_kv_row(m, a->pool, sp, a->l, 0, kvh, j),
                        (const float *)bn_kv_row(m, a->pool, sp, a->l, 1, kvh, j)};
            if (m->kv_f16) { /* into one contiguous f32 block */
                m->h2f(r.k, kb + (size_t)r.j * hd, r.n * hd);
                m->h2f(r.v, vb + (size_t)r.j * hd, r.n * hd);
            }
            run[nrun] = r;
            j = e;
        }
        if (m->kv_f16) {
            run[0] = (kv_run){0, nb, kb, vb};
            nrun = 1;
        }
        for (int t = ta; t < tb; t++) {
            int n = first + (t - ta) + 1 - j0; /* keys 0 .. its position, of which this block holds n */
            if (n <= 0) continue;
            if (n > nb) n = nb;
            size_t off = (size_t)kvh * group * hd; /* the group's q rows */
            const float *q = a->q + (size_t)t * a->ldq + off;
            float *o = a->out + (size_t)t * qn + off, *st = a->stat + ((size_t)t * m->nh + kvh * group) * 2;
            for (int i = 0; i < nrun && run[i].j < n; i++) {
                int e = run[i].j + run[i].n < n ? run[i].j + run[i].n : n;
                for (int j = run[i].j; j < e; j++)
                    m->dots(q, group, hd, run[i].k + (size_t)(j - run[i].j) * hd, scale, sc + j, ATT_BLK);
            }
            for (int r = 0; r < group; r++) {
                float *sr = sc + (size_t)r * ATT_BLK, mx = st[2 * r];
                for (int j = 0; j < n; j++) mx = sr[j] > mx ? sr[j] : mx;
                float sum = m->expsum(sr, n, mx);
                if (mx > st[2 * r]) { /* the maximum grew: rescale what is summed so far */
                    float d = st[2 * r] - mx, c = d < -104.0f ? 0.0f : expf(d);
                    st[2 * r + 1] *= c;
                    for (int i = 0; i < hd; i++) o[(size_t)r * hd + i] *= c;
                    st[2 * r] = mx;
                }
                st[2 * r + 1] += sum;
            }
            for (int i = 0; i < nrun && run[i].j < n; i++) {
                int e = run[i].j + run[i].n < n ? run[i].j + run[i].n : n;
                m->pv(o, group, hd, sc + run[i].j, ATT_BLK, run[i].v, e - run[i].j);
            }
        }
    }
    for (int t = ta; t < tb; t++)
        for (int r = 0; r < group; r++) {
            float inv = 1.0f / a->stat[((size_t)t * m->nh + kvh * group + r) * 2 + 1];
            float *o = a->out + (size_t)t * qn + (size_t)(kvh * group + r) * hd;
            for (int i = 0; i < hd; i++) o[i] *= inv;
        }
}

static void attn_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    long T = a->T, total = T * a->m->nkv, i0 = total * part / np, i1 = total * (part + 1) / np;
    float *work = a->work + (size_t)part * a->ldwork;
    while (i0 < i1) { /* (kv head, row) pairs are kv-head-major: split at kv heads and sequences */
        long kvh = i0 / T, end = (kvh + 1) * T < i1 ? (kvh + 1) * T : i1;
        int t = (int)(i0 - kvh * T), tend = (int)(end - kvh * T), s = span_at(a->spans, 0, t);
        while (t < tend) {
            const bn_span *sp = &a->spans[s = span_at(a->spans, s, t)];
            int e = sp->row0 + sp->n < tend ? sp->row0 + sp->n : tend;
            attend_span(a, sp, (int)kvh, t, e, work);
            t = e;
        }
        i0 = end;
    }
}

void bn_attention(const bn_model *m, int l, const bn_pool *pool, const bn_span *spans, int nspan, const float *qkv,
                  size_t ldqkv, float *out, float *stat, float *work, int nparts, int T) {
    attn_task at = {m, l, pool, spans, nspan, qkv, ldqkv, out, stat, work, bn_attention_ldwork(m), T};
    i2v_pool_run(attn_part, &at, nparts);
}
