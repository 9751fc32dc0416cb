/* RoPE, the KV store and attention (bitnet_impl.h), for the rows of one or many sequences: each row
 * attends to its own sequence's keys only, in the model's own cache (one sequence) or in the blocks
 * of a paged pool. Every row's arithmetic depends only on its sequence and position, never on what
 * else is in the step: a row gives the same bits alone or among others (batch invariance). */
#include <math.h>
#include <stdlib.h>
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
            if (m->kv_kind == BN_Q8_0) { /* the key's row into its lane of its tile */
                uint8_t row[BN_Q8_0_BYTES * (1024 / BN_Q8_0_BLOCK)];
                m->kv_put(kt + (size_t)h * hd, hd, row);
                bn_kt_put(row, m->kv_row, bn_kv_row(m, a->pool, sp, a->l, 0, h, ps / BN_KT * BN_KT), ps % BN_KT);
            } else {
                m->kv_put(kt + (size_t)h * hd, hd, bn_kv_row(m, a->pool, sp, a->l, 0, h, ps));
            }
            m->kv_put(vt + (size_t)h * hd, hd, bn_kv_row(m, a->pool, sp, a->l, 1, h, ps));
        }
    }
}

void bn_rope_store(const bn_model *m, int l, const bn_pool *pool, const bn_span *spans, int nspan, float *qkv,
                   int T, int nparts) {
    rope_task rt = {m, l, pool, spans, nspan, qkv, T};
    i2v_pool_run(rope_part, &rt, nparts);
}

/* ---- attention ------------------------------------------------------------------------------
 * Split-K over fixed chunks (flash-decoding). Row t at position pos sees keys 0 .. pos; they are cut
 * into chunks c = 0 .. pos / ATT_CHUNK of keys c * ATT_CHUNK .. (c + 1) * ATT_CHUNK - 1 (the last one
 * short). A unit is (sequence, kv head, chunk, up to ATT_ROWS of the sequence's rows that see the chunk):
 * for each of its rows and each of the kv head's `group` q heads it takes the chunk's scores
 * s_j = scale * q . k_j, m = max_j s_j, p_j = exp(s_j - m), l = sum_j p_j, o = sum_j p_j v_j (keys in
 * order), into the row's partials [T][nch][nh] x (o [hd], m, l). Then each row merges its chunks in
 * chunk order: M = max_c m_c, e_c = exp(m_c - M), out = (sum_c e_c o_c) / (sum_c e_c l_c).
 * Every step of that depends on the row's position only: the chunk bounds are fixed multiples of
 * ATT_CHUNK, a chunk's arithmetic is the same whichever thread or unit does it (its keys are taken in
 * runs contiguous in memory, a paged pool's blocks, and the kernels give the bits of one call for any
 * cut into runs: kvops.c), and the merge order is the chunk order. So a row gives the same bits alone
 * or among others, prefill, decode or verify, for any thread count, while one row's 4,000 keys still
 * spread over 16 chunks x 5 kv heads = 80 units for the threads (decode has T = 1: split by kv head
 * alone, 5 heads on 2 threads ran 3:2). */
#define ATT_ROWS 16 /* rows of a sequence per unit: a chunk's keys stay in cache across them */

typedef struct {
    int span, kvh, c; /* keys c * ATT_CHUNK .. of kv head kvh of sequence `span` */
    int ta, tb;       /* for rows ta .. tb - 1 of the step */
} att_unit;

struct bn_attn_plan {
    const bn_span *spans;
    int T, nch;        /* rows, and chunks of the longest row (the partials' stride) */
    att_unit *units;
    int nunits, nparts;
    int *first;        /* part p: units first[p] .. first[p + 1] - 1 */
};

void bn_attention_plan_free(bn_attn_plan *plan) {
    if (!plan) return;
    free(plan->units);
    free(plan->first);
    free(plan);
}

bn_attn_plan *bn_attention_plan(const bn_model *m, const bn_span *spans, int nspan, int T, int threads) {
    bn_attn_plan *p = (bn_attn_plan *)calloc(1, sizeof *p);
    if (!p) return NULL;
    p->spans = spans;
    p->T = T;
    long n = 0, cost_all = 0;
    for (int pass = 0; pass < 2; pass++) {
        n = 0;
        for (int s = 0; s < nspan; s++) {
            const bn_span *sp = &spans[s];
            int last = sp->pos + sp->n - 1, nc = last / ATT_CHUNK + 1;
            if (nc > p->nch) p->nch = nc;
            for (int c = 0; c < nc; c++)
                for (int h = 0; h < m->nkv; h++) {
                    int t0 = c * ATT_CHUNK - sp->pos; /* the first row (of the span) that sees chunk c */
                    t0 = t0 > 0 ? t0 : 0;
                    for (int t = t0; t < sp->n; t += ATT_ROWS, n++) {
                        if (!pass) continue;
                        int te = t + ATT_ROWS < sp->n ? t + ATT_ROWS : sp->n;
                        p->units[n] = (att_unit){s, h, c, sp->row0 + t, sp->row0 + te};
                    }
                }
        }
        if (!pass) {
            p->nunits = (int)n;
            p->units = (att_unit *)malloc((size_t)(n ? n : 1) * sizeof(att_unit));
            if (!p->units) {
                bn_attention_plan_free(p);
                return NULL;
            }
        }
    }
    /* parts of about equal cost (rows x keys), up to 4 a thread (8 made pp128 12% slower): the pool lets
     * a thread that is done take another's parts */
    long *cost = (long *)malloc((size_t)(n ? n : 1) * sizeof(long));
    int np = (int)(n < 4L * threads ? n : 4L * threads);
    p->nparts = np > 0 ? np : 1;
    p->first = (int *)malloc((size_t)(p->nparts + 1) * sizeof(int));
    if (!cost || !p->first) {
        free(cost);
        bn_attention_plan_free(p);
        return NULL;
    }
    for (long u = 0; u < n; u++) {
        const att_unit *a = &p->units[u];
        const bn_span *sp = &spans[a->span];
        int keys = sp->pos + (a->tb - 1 - sp->row0) + 1 - a->c * ATT_CHUNK;
        cost[u] = (long)(a->tb - a->ta) * (keys < ATT_CHUNK ? keys : ATT_CHUNK) + 64; /* + a unit's overhead */
        cost_all += cost[u];
    }
    long acc = 0, u = 0;
    p->first[0] = 0;
    for (int q = 0; q < p->nparts; q++) {
        long until = cost_all * (q + 1) / p->nparts;
        while (u < n && (acc + cost[u] / 2 <= until || q == p->nparts - 1)) acc += cost[u++];
        p->first[q + 1] = (int)u;
    }
    free(cost);
    return p;
}

static size_t partials(const bn_model *m, const bn_attn_plan *p) { return (size_t)p->T * p->nch * m->nh; }

/* over q8_0 keys, q's heads as the tile scores take them: [T][nh][bn_kt_query_bytes(hd)] bytes, in floats */
static size_t ktq_floats(const bn_model *m, const bn_attn_plan *p) {
    return m->kv_kind == BN_Q8_0 ? ((size_t)p->T * m->nh * bn_kt_query_bytes(m->hd) + 3) / 4 : 0;
}

size_t bn_attention_scratch(const bn_model *m, const bn_attn_plan *p) {
    return partials(m, p) * ((size_t)m->hd + 2) + (size_t)p->nparts * (m->nh / m->nkv) * ATT_CHUNK +
           ktq_floats(m, p) + 64;
}

typedef struct {
    const bn_model *m;
    int l;
    const bn_pool *pool;
    const bn_attn_plan *plan;
    const float *q; /* [T, ldq]: the q heads first in each row */
    size_t ldq;
    uint8_t *ktq;   /* q8_0 keys: q's heads for the tile scores [T][nh][bn_kt_query_bytes(hd)], else NULL */
    float *po, *pms; /* partials: o [T][nch][nh][hd], (m, l) [T][nch][nh][2] */
    float *sc;       /* [nparts][group][ATT_CHUNK] scores, then probabilities */
    float *out;      /* [T, nh*hd] */
} attn_task;

/* the end of the run from key j: its block of bs positions contiguous in memory, or `end` */
static inline int run_end(int j, int end, int bs) { return (j / bs + 1) * bs < end ? (j / bs + 1) * bs : end; }

/* The first ATT_PREFETCH rows of a run of K or V requested before the loop that reads them starts: the
 * kernels prefetch their own rows ahead within a call (kvops.c), but the first ones of each stream would
 * start cold: V's after the scores, and in a paged pool each next block's (a pool block of 16 rows is one
 * kernel call, shorter than the kernels' prefetch distance). Into L1, as measured. (The next unit's keys
 * come into L2 along p.v instead: attend_unit's bn_ahead.) Inlined by force: GCC counts a function that
 * only prefetches as pure and deletes the call */
__attribute__((always_inline)) static inline void prefetch_run(const bn_model *m, const bn_pool *pool,
                                                                const bn_span *sp, int l, int kv, int h, int j, int n,
                                                                int bs) {
    const uint8_t *row = (const uint8_t *)bn_kv_row(m, pool, sp, l, kv, h, j);
    n = run_end(j, j + n, bs) - j;
    n = n < ATT_PREFETCH ? n : ATT_PREFETCH;
    for (size_t b = 0; b < (size_t)n * m->kv_row; b += 64) __builtin_prefetch(row + b, 0, 3);
}

static void attend_unit(const attn_task *a, const att_unit *u, const att_unit *next, float *sc) {
    const bn_model *m = a->m;
    const bn_span *sp = &a->plan->spans[u->span];
    int group = m->nh / m->nkv, hd = m->hd, j0 = u->c * ATT_CHUNK;
    float scale = 1.0f / sqrtf((float)hd);
    int bs = a->pool->bs; /* positions contiguous in memory */
    for (int t = u->ta; t < u->tb; t++) {
        int pos = sp->pos + (t - sp->row0), n = pos + 1 - j0;
        n = n < ATT_CHUNK ? n : ATT_CHUNK;
        const void *q = a->ktq ? (const void *)(a->ktq + ((size_t)t * m->nh + (size_t)u->kvh * group) *
                                                             bn_kt_query_bytes(hd))
                               : (const void *)(a->q + (size_t)t * a->ldq + (size_t)u->kvh * group * hd);
        size_t slot = ((size_t)t * a->plan->nch + u->c) * m->nh + (size_t)u->kvh * group;
        float *o = a->po + slot * hd, *ms = a->pms + slot * 2;
        if (t == u->ta) prefetch_run(m, a->pool, sp, a->l, 1, u->kvh, j0, n, bs);
        for (int j = j0; j < j0 + n;) {
            int e = run_end(j, j0 + n, bs);
            if (t == u->ta && e < j0 + n) prefetch_run(m, a->pool, sp, a->l, 0, u->kvh, e, j0 + n - e, bs);
            m->scores(q, group, hd, bn_kv_row(m, a->pool, sp, a->l, 0, u->kvh, j), m->kv_row, e - j, scale,
                      sc + (j - j0), ATT_CHUNK);
            j = e;
        }
        for (int r = 0; r < group; r++) {
            float *sr = sc + (size_t)r * ATT_CHUNK, mx = m->rowmax(sr, n);
            ms[2 * r] = mx;
            ms[2 * r + 1] = m->expsum(sr, n, mx);
        }
        memset(o, 0, sizeof(float) * (size_t)group * hd);
        /* after the last row's p.v the next unit's scores: p.v requests their first run of keys (its
         * contiguous rows, up to the chunk) into L2 along the way, each run of values its share */
        bn_ahead next_keys = {NULL, 0};
        if (t == u->tb - 1 && next) {
            const bn_span *ns = &a->plan->spans[next->span];
            int nj0 = next->c * ATT_CHUNK, nn = ns->pos + (next->ta - ns->row0) + 1 - nj0;
            nn = nn < ATT_CHUNK ? nn : ATT_CHUNK;
            next_keys.p = (const uint8_t *)bn_kv_row(m, a->pool, ns, a->l, 0, next->kvh, nj0);
            int rows = run_end(nj0, nj0 + nn, bs) - nj0;
            if (m->kv_kind == BN_Q8_0) /* keys in tiles: the scores read the last one whole */
                rows = (rows + BN_KT - 1) / BN_KT * BN_KT;
            next_keys.bytes = (size_t)rows * m->kv_row;
        }
        for (int j = j0; j < j0 + n;) {
            int e = run_end(j, j0 + n, bs);
            if (t == u->ta && e < j0 + n) prefetch_run(m, a->pool, sp, a->l, 1, u->kvh, e, j0 + n - e, bs);
            size_t from = next_keys.bytes * (size_t)(j - j0) / (size_t)n, to = next_keys.bytes * (size_t)(e - j0) / (size_t)n;
            bn_ahead share = {next_keys.p ? next_keys.p + from : NULL, to - from};
            m->pv(o, group, hd, sc + (j - j0), ATT_CHUNK, bn_kv_row(m, a->pool, sp, a->l, 1, u->kvh, j), m->kv_row,
                  e - j, &share);
            j = e;
        }
    }
}

static void attn_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    (void)np;
    float *sc = a->sc + (size_t)part * (a->m->nh / a->m->nkv) * ATT_CHUNK;
    for (int u = a->plan->first[part], e = a->plan->first[part + 1]; u < e; u++)
        attend_unit(a, &a->plan->units[u], u + 1 < e ? &a->plan->units[u + 1] : NULL, sc);
}

/* rows t0 .. t1: each q head's chunks merged in chunk order */
static void merge_rows(const attn_task *a, int t0, int t1) {
    const bn_model *m = a->m;
    const bn_attn_plan *p = a->plan;
    int hd = m->hd, s = 0;
    for (int t = t0; t < t1; t++) {
        while (t >= p->spans[s].row0 + p->spans[s].n) s++;
        int nc = (p->spans[s].pos + (t - p->spans[s].row0)) / ATT_CHUNK + 1;
        for (int h = 0; h < m->nh; h++) {
            size_t slot0 = (size_t)t * p->nch * m->nh + h, st = (size_t)m->nh; /* chunk c: slot0 + c * st */
            float M = a->pms[slot0 * 2], L = 0.0f, *o = a->out + ((size_t)t * m->nh + h) * hd;
            for (int c = 1; c < nc; c++) M = a->pms[(slot0 + c * st) * 2] > M ? a->pms[(slot0 + c * st) * 2] : M;
            for (int c = 0; c < nc; c++) {
                const float *ms = a->pms + (slot0 + c * st) * 2, *oc = a->po + (slot0 + c * st) * hd;
                float d = ms[0] - M, e = d < -104.0f ? 0.0f : expf(d);
                L += e * ms[1];
                if (c == 0)
                    for (int i = 0; i < hd; i++) o[i] = e * oc[i];
                else
                    for (int i = 0; i < hd; i++) o[i] += e * oc[i];
            }
            float inv = 1.0f / L;
            for (int i = 0; i < hd; i++) o[i] *= inv;
        }
    }
}

static void merge_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    merge_rows(a, (int)((long)a->plan->T * part / np), (int)((long)a->plan->T * (part + 1) / np));
}

/* fn over the step's rows: in this thread for fewer than 4, else in parts over the pool */
static void over_rows(i2v_task_fn fn, attn_task *at) {
    int parts = at->plan->T < 4 ? 1 : 2 * i2v_pool_threads();
    if (parts > at->plan->T) parts = at->plan->T;
    if (parts <= 1) fn(at, 0, 1);
    else i2v_pool_run(fn, at, parts);
}

/* the q heads of rows t0 .. t1 as the tile scores take them */
static void ktq_part(void *ctx, int part, int np) {
    const attn_task *a = (const attn_task *)ctx;
    const bn_model *m = a->m;
    size_t qb = bn_kt_query_bytes(m->hd);
    for (int t = (int)((long)a->plan->T * part / np), t1 = (int)((long)a->plan->T * (part + 1) / np); t < t1; t++)
        for (int h = 0; h < m->nh; h++)
            bn_kt_query(m->kv_put, a->q + (size_t)t * a->ldq + (size_t)h * m->hd, m->hd,
                        a->ktq + ((size_t)t * m->nh + h) * qb);
}

void bn_attention(const bn_model *m, int l, const bn_pool *pool, const bn_attn_plan *plan, const float *qkv,
                  size_t ldqkv, float *out, float *work) {
    size_t np = partials(m, plan);
    float *po = work, *pms = po + np * m->hd, *sc = pms + np * 2;
    float *ktq = sc + (size_t)plan->nparts * (m->nh / m->nkv) * ATT_CHUNK;
    attn_task at = {m, l, pool, plan, qkv, ldqkv, ktq_floats(m, plan) ? (uint8_t *)ktq : NULL, po, pms, sc, out};
    if (at.ktq) over_rows(ktq_part, &at);
    i2v_pool_run(attn_part, &at, plan->nparts);
    over_rows(merge_part, &at);
}
