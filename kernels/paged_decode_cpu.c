/* Paged decode attention for float32 queries on the CPU: one query token per request, its keys and
 * values read in place from the paged cache (no gather copy), each KV head's block read once for all
 * the query heads that share it (GQA). Built and called by paged_decode_cpu.py; its torch reference is the gather + SDPA path of
 * services/worker/layers/attention_torch.py.
 *
 * q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids;
 * seq_lens [B]; out [B, H, D]. Rows b in [b_lo, b_hi) are computed (callers split the batch over
 * threads). Needs scratch for max_seq_len * H / Hkv + 2 * D floats per call.
 * The cache holds float32, or with lut (256 floats: each fp8 byte's value) fp8 bytes; each row is
 * then widened through the table once for all the heads of its group, and keys and values are
 * scaled by k_scale and v_scale (1 for a float32 cache).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Row s of one KV head: in place for a float32 cache, else widened into buf. */
static inline const float *cache_row(const void *cache, const float *lut, int64_t offset, int64_t D, float *buf) {
    if (!lut) return (const float *)cache + offset;
    const uint8_t *bytes = (const uint8_t *)cache + offset;
    for (int64_t d = 0; d < D; d++) buf[d] = lut[bytes[d]];
    return buf;
}

void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *seq_lens, float *out, int64_t b_lo, int64_t b_hi, int64_t W, int64_t H,
                  int64_t Hkv, int64_t D, int64_t bs, float scale, float *scratch, const float *lut, float k_scale,
                  float v_scale) {
    const int64_t G = H / Hkv, row = Hkv * D;
    float *kbuf = scratch, *vbuf = scratch + D, *scores = scratch + 2 * D;
    scale *= k_scale;
    for (int64_t b = b_lo; b < b_hi; b++) {
        const int64_t S = seq_lens[b];
        const int64_t *table = tables + b * W;
        for (int64_t h = 0; h < Hkv; h++) {
            const float *qh = q + (b * H + h * G) * D;
            for (int64_t s = 0; s < S; s++) {
                const float *k = cache_row(k_cache, lut, (table[s / bs] * bs + s % bs) * row + h * D, D, kbuf);
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
                for (int64_t s = 0; s < S; s++) sc[s] = sc[s] / sum * v_scale;
            }
            float *oh = out + (b * H + h * G) * D;
            for (int64_t i = 0; i < G * D; i++) oh[i] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                const float *v = cache_row(v_cache, lut, (table[s / bs] * bs + s % bs) * row + h * D, D, vbuf);
                for (int64_t g = 0; g < G; g++) {
                    const float p = scores[g * S + s];
                    float *o = oh + g * D;
                    for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
                }
            }
        }
    }
}
