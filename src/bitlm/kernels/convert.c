/* Hugging Face packed layout -> I2V, in one pass (portable C; the numpy reference is
 * formats/i2v.py's from_hf_packed, which is ~0.4 s per 6912 x 2560 matrix: too slow for loading).
 *
 * HF: uint8 [q = ceil(out/4), in]; bits 2i..2i+1 of byte [r, c] = code of row i*q + r, column c.
 * So row n's codes are byte row n % q shifted right by 2 * (n / q). Four HF bytes (columns
 * 16kb+4s .. 16kb+4s+3) read as one uint32, shifted and masked with 0x03030303, are the codes of
 * I2V byte lanes j = 0..3 at shift s; OR-ing the four s at shifts 0, 2, 4, 6 gives the four I2V
 * bytes 4r+j of row n in block kb as one uint32 (no byte overflows: codes are at most 3). */
#include <string.h>

#include "i2v.h"

typedef struct {
    const uint8_t *hf;
    int out, in, Kb, Nb;
    uint8_t *dst;
    int fmt;  /* I2V_FMT_* */
} convert_task;

static uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static void convert_rows(const convert_task *t, int rb0, int rb1) {
    int q = (t->out + 3) / 4, full = t->in / I2V_COLS;  /* blocks with no padding column */
    for (int rb = rb0; rb < rb1; rb++) {
        for (int r = 0; r < I2V_ROWS; r++) {
            int n = rb * I2V_ROWS + r;
            uint8_t *d = t->dst + (size_t)rb * t->Kb * I2V_BLOCK + 4 * r;  /* + kb * 64 */
            if (n >= t->out) {  /* padding row: zero weights */
                for (int kb = 0; kb < t->Kb; kb++) memset(d + (size_t)kb * I2V_BLOCK, 0x55, 4);
                continue;
            }
            const uint8_t *h = t->hf + (size_t)(n % q) * t->in;
            int shift = 2 * (n / q);
            for (int kb = 0; kb < full; kb++) {
                const uint8_t *hk = h + kb * I2V_COLS;
                uint32_t v = ((load32(hk) >> shift) & 0x03030303u) | (((load32(hk + 4) >> shift) & 0x03030303u) << 2) |
                             (((load32(hk + 8) >> shift) & 0x03030303u) << 4) |
                             (((load32(hk + 12) >> shift) & 0x03030303u) << 6);
                memcpy(d + (size_t)kb * I2V_BLOCK, &v, 4);
            }
            for (int kb = full; kb < t->Kb; kb++) {  /* the ragged last block: padding code 1 */
                uint8_t b[4];
                for (int j = 0; j < 4; j++) {
                    b[j] = 0;
                    for (int s = 0; s < 4; s++) {
                        int k = kb * I2V_COLS + 4 * s + j;
                        int c = k < t->in ? (h[k] >> shift) & 3 : 1;
                        b[j] |= (uint8_t)(c << (2 * s));
                    }
                }
                memcpy(d + (size_t)kb * I2V_BLOCK, b, 4);
            }
        }
    }
}

/* T5 (formats/t5.py): byte 4r+i of block (rb, kb) = ceil(256 v / 243), v the base-3 number of the codes of
 * row 16rb+r at columns 20kb+4j+i, j = 0..4 (j = 0 most significant); padding code 1 */
static void convert_rows_t5(const convert_task *t, int rb0, int rb1) {
    int q = (t->out + 3) / 4;
    for (int rb = rb0; rb < rb1; rb++)
        for (int r = 0; r < I2V_ROWS; r++) {
            int n = rb * I2V_ROWS + r;
            uint8_t *d = t->dst + (size_t)rb * t->Kb * I2V_BLOCK + 4 * r;  /* + kb * 64 */
            const uint8_t *h = n < t->out ? t->hf + (size_t)(n % q) * t->in : NULL;
            int shift = 2 * (n / q);
            for (int kb = 0; kb < t->Kb; kb++)
                for (int i = 0; i < 4; i++) {
                    unsigned v = 0;
                    for (int j = 0; j < 5; j++) {
                        int k = kb * T5_COLS + 4 * j + i;
                        v = 3 * v + (h && k < t->in ? (unsigned)(h[k] >> shift) & 3 : 1);
                    }
                    d[(size_t)kb * I2V_BLOCK + i] = (uint8_t)((256 * v + 242) / 243);
                }
        }
}

static void convert_part(void *ctx, int p, int np) {
    const convert_task *t = (const convert_task *)ctx;
    int rb0 = (int)((long)t->Nb * p / np), rb1 = (int)((long)t->Nb * (p + 1) / np);
    if (t->fmt == I2V_FMT_T5) convert_rows_t5(t, rb0, rb1);
    else convert_rows(t, rb0, rb1);
}

int i2v_from_hf_fmt(int fmt, const uint8_t *hf, int out, int in, uint8_t *dst) {
    if (out <= 0 || in <= 0 || fmt < 0 || fmt >= I2V_NFMTS) return -1;
    int cols = i2v_fmt_cols(fmt);
    convert_task t = {hf, out, in, (in + cols - 1) / cols, (out + I2V_ROWS - 1) / I2V_ROWS, dst, fmt};
    int parts = t.Nb < 4 * i2v_pool_threads() ? 1 : 4 * i2v_pool_threads();
    i2v_pool_run(convert_part, &t, parts);
    return 0;
}

int i2v_from_hf(const uint8_t *hf, int out, int in, uint8_t *dst) { return i2v_from_hf_fmt(I2V_FMT_I2V, hf, out, in, dst); }
