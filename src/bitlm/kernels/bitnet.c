/* The whole BitNet b1.58 forward in C (bitnet.h): embedding, per block RMSNorm -> int8 activations
 * -> ternary q/k/v (I2V kernels) -> RoPE -> attention over the KV cache -> sub-norm -> o, then
 * RMSNorm -> gate/up -> relu2 (or SiLU) gating -> sub-norm -> down, residuals, the final norm and the
 * head. It mirrors model.py step for step, so the logits equal the torch reference path's up to
 * float rounding (the integer sums are exact; only float reductions differ in order).
 *
 * This file: the model from its descriptor, its scratch and profile counters. The forward itself is
 * split by concern (bitnet_impl.h lists the files). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#define _DEFAULT_SOURCE           /* MAP_ANONYMOUS, madvise */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

#include "bitnet_impl.h"

/* A private anonymous mapping on ordinary pages: resident only where it is written, returned to
 * the system when it is replaced, no malloc heap left holding freed megabytes, no page faults on
 * every call. */
char *bn_scratch(bn_model *m, size_t bytes) {
    if (bytes <= m->scratch_bytes) return m->scratch;
    if (m->scratch) munmap(m->scratch, m->scratch_bytes);
    size_t page = 1 << 16;
    bytes = (bytes + page - 1) / page * page;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        m->scratch = NULL;
        m->scratch_bytes = 0;
        return NULL;
    }
#ifdef MADV_NOHUGEPAGE
    madvise(p, bytes, MADV_NOHUGEPAGE); /* a huge page would make 2 MB resident for each touch */
#endif
    m->scratch = (char *)p;
    m->scratch_bytes = bytes;
    return m->scratch;
}

int64_t bn_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void bn_profile(bn_model *m, int enable, int64_t *out, int reset) {
    if (out) memcpy(out, m->prof, sizeof m->prof);
    if (reset) memset(m->prof, 0, sizeof m->prof);
    if (enable >= 0) m->profiling = enable;
}

#define PTR(T, v) ((T)(uintptr_t)(v))

bn_model *bn_model_new(const int64_t *ints, int nints, const double *flts, int nflts) {
    if (nints < BN_NI) return NULL;
    int L = (int)ints[BN_I_LAYERS];
    if (L < 0 || nints != BN_NI + BN_NL * L || nflts != 1 + 7 * L) return NULL;
    bn_model *m = (bn_model *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->L = L;
    m->H = (int)ints[BN_I_HIDDEN];
    m->I = (int)ints[BN_I_INTER];
    m->nh = (int)ints[BN_I_HEADS];
    m->nkv = (int)ints[BN_I_KV_HEADS];
    m->hd = (int)ints[BN_I_HEAD_DIM];
    m->V = (int)ints[BN_I_VOCAB];
    m->max_len = (int)ints[BN_I_MAX_LEN];
    m->act = (int)ints[BN_I_ACT];
    m->embed_kind = (int)ints[BN_I_EMBED_KIND];
    m->head_kind = (int)ints[BN_I_HEAD_KIND];
    m->path = (int)ints[BN_I_PATH];
    m->kv_kind = (int)ints[BN_I_KV_KIND];
    m->wfmt = (int)ints[BN_I_WFMT];
    if (m->wfmt < 0 || m->wfmt >= I2V_NFMTS) {
        free(m);
        return NULL;
    }
    m->eps = (float)flts[0];
    int path = m->path < 0 ? i2v_best_path() : m->path;
    m->dot = bn_pick_dot(path);
    m->expsum = bn_pick_expsum(path);
    m->rowmax = bn_pick_rowmax(path);
    bn_pick_kv(path, m->kv_kind, m->hd, &m->scores, &m->pv, &m->kv_put);
    m->kv_row = bn_kv_row_bytes(m->kv_kind, m->hd);
    m->cos = PTR(const float *, ints[BN_I_ROPE_COS]);
    m->sin = PTR(const float *, ints[BN_I_ROPE_SIN]);
    m->final_norm = PTR(const float *, ints[BN_I_FINAL_NORM]);
    m->embed = PTR(const void *, ints[BN_I_EMBED]);
    m->embed_fd = (int)ints[BN_I_EMBED_FD];
    m->embed_offset = ints[BN_I_EMBED_OFFSET];
    m->head = PTR(const void *, ints[BN_I_HEAD]);
    m->head_scale = PTR(const float *, ints[BN_I_HEAD_SCALE]);
    m->head_rowsum = PTR(const int32_t *, ints[BN_I_HEAD_ROWSUM]);
    m->kv = PTR(char *, ints[BN_I_KV_CACHE]);
    if (m->H <= 0 || m->I <= 0 || m->nh <= 0 || m->nkv <= 0 || m->nh % m->nkv || m->hd <= 0 || m->hd % 2 ||
        m->V <= 0 || m->max_len <= 0 || m->max_len > INT_MAX - BN_KV_BLOCK || m->hd > 1024 || (m->kv_kind != BN_F32 && m->kv_kind != BN_F16 && m->kv_kind != BN_Q8_0) || m->act < 0 || m->act > 1 || m->embed_kind < 0 || m->embed_kind > 1 ||
        m->head_kind < 0 || m->head_kind > 4 || m->head_kind == BN_F16 ||
        (m->head_kind == BN_Q8 && (!m->head_scale || !m->head_rowsum)) || (m->head_kind == BN_Q6 && !m->head_scale) ||
        (!m->embed && m->embed_fd < 0) || m->embed_offset < 0 || !m->head || !m->cos || !m->sin || !m->final_norm || !m->kv) {
        free(m);
        return NULL;
    }
    m->layers = (bn_layer *)calloc((size_t)(L ? L : 1), sizeof(bn_layer));
    m->own_blocks = (int32_t *)malloc((size_t)bn_kv_blocks(m->max_len) * sizeof(int32_t));
    if (!m->layers || !m->own_blocks) {
        free(m->layers);
        free(m->own_blocks);
        free(m);
        return NULL;
    }
    for (int b = 0; b < bn_kv_blocks(m->max_len); b++) m->own_blocks[b] = b;
    int q = m->nh * m->hd, kv = m->nkv * m->hd;
    int shapes[7][2] = {{q, m->H}, {kv, m->H}, {kv, m->H}, {m->H, q}, {m->I, m->H}, {m->I, m->H}, {m->H, m->I}};
    for (int l = 0; l < L; l++) {
        const int64_t *li = ints + BN_NI + BN_NL * l;
        bn_layer *y = &m->layers[l];
        y->attn_norm = PTR(const float *, li[BN_L_ATTN_NORM]);
        y->ffn_norm = PTR(const float *, li[BN_L_FFN_NORM]);
        y->attn_sub_norm = PTR(const float *, li[BN_L_ATTN_SUB_NORM]);
        y->ffn_sub_norm = PTR(const float *, li[BN_L_FFN_SUB_NORM]);
        for (int j = 0; j < 7; j++) {
            y->proj[j].w = PTR(const uint8_t *, li[BN_L_Q + j]);
            y->proj[j].N = shapes[j][0];
            y->proj[j].K = shapes[j][1];
            y->proj[j].scale = (float)flts[1 + 7 * l + j];
        }
    }
    return m;
}

void bn_model_free(bn_model *m) {
    if (!m) return;
    if (m->scratch) munmap(m->scratch, m->scratch_bytes);
    free(m->layers);
    free(m->own_blocks);
    free(m);
}

