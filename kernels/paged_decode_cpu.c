/* Paged decode attention for float32 on the CPU: one query token per request, its keys and values
 * read in place from the paged cache (no gather copy), each KV head's block read once for all the
 * query heads that share it (GQA). Built and called by paged_decode_cpu.py; its torch reference is the gather + SDPA path of
 * services/worker/layers/attention_torch.py.
 *
 * q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids;
 * seq_lens [B]; out [B, H, D]. Rows b in [b_lo, b_hi) are computed (callers split the batch over
 * threads). Needs scratch for max_seq_len * H / Hkv floats per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                      const int64_t *seq_lens, float *out, int64_t b_lo, int64_t b_hi, int64_t W, int64_t H,
                      int64_t Hkv, int64_t D, int64_t bs, float scale, float *scores) {
    const int64_t G = H / Hkv, row = Hkv * D;
    for (int64_t b = b_lo; b < b_hi; b++) {
        const int64_t S = seq_lens[b];
        const int64_t *table = tables + b * W;
        for (int64_t h = 0; h < Hkv; h++) {
            const float *qh = q + (b * H + h * G) * D;
            for (int64_t s = 0; s < S; s++) {
                const float *k = k_cache + (table[s / bs] * bs + s % bs) * row + h * D;
                for (int64_t g = 0; g < G; g++) {
                    const float *qg = qh + g * D;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];
                    scores[g * S + s] = dot * scale;
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *sc = scores + g * S, top = -INFINITY, sum = 0.0f;
                for (int64_t s = 0; s < S; s++) top = sc[s] > top ? sc[s] : top;
                for (int64_t s = 0; s < S; s++) sum += (sc[s] = expf(sc[s] - top));
                for (int64_t s = 0; s < S; s++) sc[s] /= sum;
            }
            float *oh = out + (b * H + h * G) * D;
            for (int64_t i = 0; i < G * D; i++) oh[i] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                const float *v = v_cache + (table[s / bs] * bs + s % bs) * row + h * D;
                for (int64_t g = 0; g < G; g++) {
                    const float p = scores[g * S + s];
                    float *o = oh + g * D;
                    for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
                }
            }
        }
    }
}
