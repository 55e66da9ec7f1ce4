/* Paged decode attention for float32 queries on the CPU: one query token per request, its keys and
 * values read in place from the paged cache (no gather copy), each KV head's rows read once for all
 * the query heads that share it (GQA). Built and called by paged_decode_cpu.py; its torch reference
 * is the gather + SDPA path of services/worker/layers/attention_torch.py.
 *
 * q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids;
 * seq_lens [B]; out [B, H, D]. The requests and KV heads are split over `threads` OpenMP threads;
 * scratch holds scratch_stride (>= max_seq_len + 2 * D) floats per thread.
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
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline int64_t thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
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

void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *seq_lens, float *out, int64_t B, int64_t W, int64_t H, int64_t Hkv, int64_t D,
                  int64_t bs, float scale, float *scratch, int64_t scratch_stride, const float *lut, float k_scale,
                  float v_scale, int64_t threads) {
    const int64_t G = H / Hkv, row = Hkv * D;
    scale *= k_scale;
    /* one work item per request and KV head, so that one long request still uses every thread */
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            float *buf = scratch + thread_id() * scratch_stride, *scores = buf + 2 * D;
            const int64_t S = seq_lens[b], head = kvh * D;
            const int64_t *table = tables + b * W;
            /* the G query heads of one KV head in turn: its rows stay in cache for the next head */
            for (int64_t h = kvh * G; h < (kvh + 1) * G; h++) {
                const float *qh = q + (b * H + h) * D;
                float *oh = out + (b * H + h) * D;
                if (D == 64) scores_64(qh, k_cache, lut, table, S, bs, row, head, scale, buf, scores);
                else if (D == 128) scores_128(qh, k_cache, lut, table, S, bs, row, head, scale, buf, scores);
                else scores_any(qh, k_cache, lut, table, S, bs, row, head, D, scale, buf, scores);
                softmax(scores, S, v_scale);
                if (D == 64) values_64(scores, v_cache, lut, table, S, bs, row, head, buf, oh);
                else if (D == 128) values_128(scores, v_cache, lut, table, S, bs, row, head, buf, oh);
                else values_any(scores, v_cache, lut, table, S, bs, row, head, D, buf, oh);
            }
        }
    }
}
