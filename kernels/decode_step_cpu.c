/* Every decoder layer of a Llama-family model for one decode step on the CPU, in one call: float32
 * activations over float32, bfloat16 or int8 weights.
 *
 * At a few rows a decode step's time beyond reading the weights is dispatch: each layer runs about
 * thirty torch ops and five kernel calls from Python, tens of microseconds each. Here the whole
 * stack of layers is one C call that runs the same kernels (f32_linear_cpu.c for the float32 and
 * bfloat16 projections, int8_linear_cpu.c for int8 ones, paged_decode_cpu.c for attention,
 * rows_cpu.c for RMSNorm with the residual add, rotary and SiLU-and-mul, on the cpu_pool.h
 * threads), with the KV cache write (float32, bfloat16 rounded as torch rounds, or fp8 quantized
 * as kv_write_cpu.c does) inline. Built and called by
 * decode_step_cpu.py; its reference is the model's own forward (services/worker/models/llama.py),
 * which every other step runs.
 *
 * Per layer: x, residual = norm(hidden + residual) (the first layer: norm(hidden), hidden);
 * q, k, v = x Wqkv^T (+ b); rotate q, k; write k, v at their slots; attend over the paged cache;
 * hidden = attn Wo^T (+ b); x, residual = norm(hidden + residual); hidden = down(silu(gate) * up).
 * The final norm and the LM head stay with the caller.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "f32_linear_cpu.c"
#include "int8_linear_cpu.c"
#include "kv_write_cpu.c"
#include "paged_decode_cpu.c"
#include "rows_cpu.c"

/* One layer's parameters (biases may be NULL) and its KV cache [num_blocks, block_size, Hkv, D].
 * A projection's weight is float32, or int8 with per-row scales (its _s; NULL for float32). */
struct layer {
    const float *input_norm, *post_norm;
    const void *qkv_w;
    const float *qkv_b;
    const void *o_w;
    const float *o_b;
    const void *gate_up_w;
    const float *gate_up_b;
    const void *down_w;
    const float *down_b;
    void *k_cache, *v_cache;
    const float *qkv_s, *o_s, *gate_up_s, *down_s;
    float k_scale, v_scale; /* an fp8 cache's (1 for float32) */
    float *aux; /* when set: receives the residual stream entering this layer, [T, H] (an EAGLE-3 head's input) */
};

/* Row t's keys or values (row floats) into slot `slot` of a float32, bfloat16 or fp8 (kv_fmt) cache. */
static void write_kv(void *cache, int64_t slot, const float *src, int64_t row, float scale, int64_t kv_fmt) {
    if (kv_fmt == F32) memcpy((float *)cache + slot * row, src, (size_t)row * sizeof(float));
    else if (kv_fmt == BF16)
        for (int64_t i = 0; i < row; i++) ((uint16_t *)cache)[slot * row + i] = to_bf16(src[i]);
    else quantize_row(src, (uint8_t *)cache + slot * row, row, scale, (int)kv_fmt);
}

struct shape {
    int64_t hidden, heads, kv_heads, head_dim, inter, block_size, table_width;
    float eps, scale;
    int64_t kv_fmt; /* the caches' format, as paged_decode's fmt */
    int64_t w_fmt;  /* the weights' that are not int8: F32 or BF16 */
};

/* y = x w^T (+ b) through the int8 kernel (w_scale set) or the float32 one over w_fmt weights. */
static void project(const float *x, const void *w, const float *w_scale, const float *b, float *y, int64_t M,
                    int64_t K, int64_t N, int64_t threads, int64_t w_fmt) {
    if (w_scale) int8_linear(x, w, w_scale, b, y, M, K, N, threads);
    else linear_any(x, w, b, y, M, K, N, threads, (int)w_fmt);
}

/* hidden [T, H] (in: the embeddings; out: the last layer's output) and residual [T, H] (out: the
 * residual stream to add before the final norm); positions, slots, seq_lens [T]; tables [B, W], row t
 * reading table row table_rows[t] (t where table_rows is NULL), as paged_decode's;
 * scratch: T * (H + (Hq + 2 Hkv) D + 2 Hq D + 3 I) floats. */
void decode_layers(const struct layer *layers, int64_t num_layers, const struct shape *s, const float *cos_sin,
                   int64_t T, const int64_t *positions, const int64_t *slots, const int64_t *tables,
                   const int64_t *table_rows, const int64_t *seq_lens, float *hidden, float *residual, float *scratch,
                   int64_t threads) {
    const int64_t H = s->hidden, D = s->head_dim, Hq = s->heads, Hkv = s->kv_heads, I = s->inter;
    const int64_t qkv_n = (Hq + 2 * Hkv) * D, row = Hkv * D;
    float *x = scratch, *qkv = x + T * H, *q = qkv + T * qkv_n, *attn = q + T * Hq * D;
    float *gate_up = attn + T * Hq * D, *act = gate_up + T * 2 * I;
    memcpy(residual, hidden, (size_t)(T * H) * sizeof(float));
    for (int64_t l = 0; l < num_layers; l++) {
        const struct layer *L = layers + l;
        rms_norm(hidden, l ? residual : NULL, residual, L->input_norm, x, T, H, s->eps, F32, threads);
        if (L->aux) memcpy(L->aux, residual, (size_t)(T * H) * sizeof(float)); /* residual: what enters layer l */
        project(x, L->qkv_w, L->qkv_s, L->qkv_b, qkv, T, H, qkv_n, threads, s->w_fmt);
        rotary(qkv, qkv_n, Hq, D, positions, cos_sin, T, F32, threads);
        rotary(qkv + Hq * D, qkv_n, Hkv, D, positions, cos_sin, T, F32, threads);
        for (int64_t t = 0; t < T; t++) {
            if (slots[t] < 0) continue; /* a padding token has no slot */
            write_kv(L->k_cache, slots[t], qkv + t * qkv_n + Hq * D, row, L->k_scale, s->kv_fmt);
            write_kv(L->v_cache, slots[t], qkv + t * qkv_n + (Hq + Hkv) * D, row, L->v_scale, s->kv_fmt);
        }
        /* queries at qkv row starts, qkv_n floats apart: copied to [T, Hq, D] for the kernel */
        for (int64_t t = 0; t < T; t++) memcpy(q + t * Hq * D, qkv + t * qkv_n, (size_t)(Hq * D) * sizeof(float));
        paged_decode(q, L->k_cache, L->v_cache, tables, table_rows, seq_lens, attn, T, s->table_width, Hq, Hkv, D,
                     s->block_size,
                     s->scale, s->kv_fmt, L->k_scale, L->v_scale, threads);
        project(attn, L->o_w, L->o_s, L->o_b, hidden, T, Hq * D, H, threads, s->w_fmt);
        rms_norm(hidden, residual, residual, L->post_norm, x, T, H, s->eps, F32, threads);
        project(x, L->gate_up_w, L->gate_up_s, L->gate_up_b, gate_up, T, H, 2 * I, threads, s->w_fmt);
        silu_and_mul(gate_up, act, T, I, F32, threads);
        project(act, L->down_w, L->down_s, L->down_b, hidden, T, I, H, threads, s->w_fmt);
    }
}
