/* Paged decode attention for float32 queries on the CPU: one query token per request, its keys and
 * values read in place from the paged cache (no gather copy), each KV head's rows read once for all
 * the query heads that share it (GQA). Built and called by paged_decode_cpu.py; its torch reference
 * is the gather + SDPA path of services/worker/layers/attention_torch.py.
 *
 * q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids;
 * seq_lens [B]; out [B, H, D]. The requests and their KV heads are split over `threads` threads
 * (cpu_pool.h).
 * The cache holds float32, or with lut (256 floats: each fp8 byte's value) fp8 bytes; each row is
 * then widened through the table, and keys and values are scaled by k_scale and v_scale (1 for a
 * float32 cache).
 *
 * Speed: decode attention is bound by reading the cache, so the loops keep what they reuse in
 * registers. Head dims of 64 and 128 get fixed-size copies of the inner loops (a query head and
 * an output head held in vector registers across the keys); the block table is walked block by
 * block, with no division per key.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_pool.h"

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* Row s of one KV head: in place for a float32 cache, else widened into buf. */
static inline const float *cache_row(const void *cache, const float *lut, int64_t offset, int64_t D, float *buf) {
    if (!lut) return (const float *)cache + offset;
    const uint8_t *bytes = (const uint8_t *)cache + offset;
    for (int64_t d = 0; d < D; d++) buf[d] = lut[bytes[d]];
    return buf;
}

/* scores[s] = q . k_s * scale for the S keys of one request and KV head. */
#define SCORES_FIXED(DIM)                                                                                 \
    static void scores_##DIM(const float *q, const void *cache, const float *lut, const int64_t *table,  \
                             int64_t S, int64_t bs, int64_t row, int64_t head, float scale, float *buf,    \
                             float *scores) {                                                           \
        v8 qv[DIM / 8];                                                                                  \
        for (int j = 0; j < DIM / 8; j++) qv[j] = load8(q + 8 * j);                                      \
        for (int64_t s0 = 0; s0 < S; s0 += bs) {                                                         \
            const int64_t n = S - s0 < bs ? S - s0 : bs, base = table[s0 / bs] * bs * row + head;         \
            for (int64_t i = 0; i < n; i++) {                                                            \
                const float *k = cache_row(cache, lut, base + i * row, DIM, buf);                         \
                v8 a0 = qv[0] * load8(k), a1 = qv[1] * load8(k + 8);                                    \
                for (int j = 2; j < DIM / 8; j += 2) {                                                    \
                    a0 += qv[j] * load8(k + 8 * j);                                                      \
                    a1 += qv[j + 1] * load8(k + 8 * j + 8);                                              \
                }                                                                                        \
                scores[s0 + i] = hsum8(a0 + a1) * scale;                                                 \
            }                                                                                            \
        }                                                                                                \
    }

/* out = sum_s p[s] * v_s for the S values of one request and KV head. */
#define VALUES_FIXED(DIM)                                                                                 \
    static void values_##DIM(const float *p, const void *cache, const float *lut, const int64_t *table,  \
                             int64_t S, int64_t bs, int64_t row, int64_t head, float *buf, float *out) {   \
        v8 o[DIM / 8] = {0};                                                                             \
        for (int64_t s0 = 0; s0 < S; s0 += bs) {                                                         \
            const int64_t n = S - s0 < bs ? S - s0 : bs, base = table[s0 / bs] * bs * row + head;         \
            for (int64_t i = 0; i < n; i++) {                                                            \
                const float *v = cache_row(cache, lut, base + i * row, DIM, buf);                         \
                const float w = p[s0 + i];                                                               \
                for (int j = 0; j < DIM / 8; j++) o[j] += w * load8(v + 8 * j);                          \
            }                                                                                            \
        }                                                                                                \
        for (int j = 0; j < DIM / 8; j++) store8(out + 8 * j, o[j]);                                     \
    }

SCORES_FIXED(64)
SCORES_FIXED(128)
VALUES_FIXED(64)
VALUES_FIXED(128)

static void scores_any(const float *q, const void *cache, const float *lut, const int64_t *table, int64_t S,
                       int64_t bs, int64_t row, int64_t head, int64_t D, float scale, float *buf, float *scores) {
    for (int64_t s = 0; s < S; s++) {
        const float *k = cache_row(cache, lut, table[s / bs] * bs * row + (s % bs) * row + head, D, buf);
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += q[d] * k[d];
        scores[s] = dot * scale;
    }
}

static void values_any(const float *p, const void *cache, const float *lut, const int64_t *table, int64_t S,
                       int64_t bs, int64_t row, int64_t head, int64_t D, float *buf, float *out) {
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const float *v = cache_row(cache, lut, table[s / bs] * bs * row + (s % bs) * row + head, D, buf);
        for (int64_t d = 0; d < D; d++) out[d] += p[s] * v[d];
    }
}

/* In place: sc[s] <- softmax(sc)[s] * v_scale. */
static void softmax(float *sc, int64_t S, float v_scale) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s < S; s++) top = sc[s] > top ? sc[s] : top;
    for (int64_t s = 0; s < S; s++) sum += (sc[s] = expf(sc[s] - top));
    const float norm = v_scale / sum;
    for (int64_t s = 0; s < S; s++) sc[s] *= norm;
}

struct args {
    const float *q;
    const void *k_cache, *v_cache;
    const int64_t *tables, *seq_lens;
    float *out;
    int64_t W, H, Hkv, D, bs;
    float scale, v_scale;
    const float *lut;
};

/* Work items [lo, hi): item i is request i / Hkv and its KV head i % Hkv, with the G query heads
 * that read it in turn (the head's rows stay in cache for the next). */
static void items(void *ctx, int64_t lo, int64_t hi) {
    const struct args *a = ctx;
    const int64_t D = a->D, G = a->H / a->Hkv, row = a->Hkv * D, bs = a->bs;
    int64_t longest = 0;
    for (int64_t i = lo; i < hi; i++) longest = a->seq_lens[i / a->Hkv] > longest ? a->seq_lens[i / a->Hkv] : longest;
    float *buf = malloc((size_t)(longest + 2 * D) * sizeof(float)), *scores = buf + 2 * D;
    if (!buf) abort();
    for (int64_t i = lo; i < hi; i++) {
        const int64_t b = i / a->Hkv, head = (i % a->Hkv) * D, S = a->seq_lens[b];
        const int64_t *table = a->tables + b * a->W;
        const void *kc = a->k_cache, *vc = a->v_cache;
        const float *lut = a->lut;
        for (int64_t h = (i % a->Hkv) * G; h < (i % a->Hkv + 1) * G; h++) {
            const float *qh = a->q + (b * a->H + h) * D;
            float *oh = a->out + (b * a->H + h) * D;
            if (D == 64) scores_64(qh, kc, lut, table, S, bs, row, head, a->scale, buf, scores);
            else if (D == 128) scores_128(qh, kc, lut, table, S, bs, row, head, a->scale, buf, scores);
            else scores_any(qh, kc, lut, table, S, bs, row, head, D, a->scale, buf, scores);
            softmax(scores, S, a->v_scale);
            if (D == 64) values_64(scores, vc, lut, table, S, bs, row, head, buf, oh);
            else if (D == 128) values_128(scores, vc, lut, table, S, bs, row, head, buf, oh);
            else values_any(scores, vc, lut, table, S, bs, row, head, D, buf, oh);
        }
    }
    free(buf);
}

void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *seq_lens, float *out, int64_t B, int64_t W, int64_t H, int64_t Hkv, int64_t D,
                  int64_t bs, float scale, const float *lut, float k_scale, float v_scale, int64_t threads) {
    struct args a = {q, k_cache, v_cache, tables, seq_lens, out, W, H, Hkv, D, bs, scale * k_scale, v_scale, lut};
    parallel_for(B * Hkv, pool_chunk(B * Hkv, threads, 1), threads, items, &a);
}
