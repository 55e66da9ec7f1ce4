/* Paged decode attention for float32 queries on the CPU: one query token per request, its keys and
 * values read in place from the paged cache (no gather copy), each KV head's rows read once for all
 * the query heads that share it (GQA). Built and called by paged_decode_cpu.py; its torch reference
 * is the gather + SDPA path of services/worker/layers/attention_torch.py.
 *
 * q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids;
 * seq_lens [B]; out [B, H, D]. The requests and their KV heads are split over `threads` threads
 * (cpu_pool.h).
 * The cache holds float32 (fmt 0), or fp8 bytes (fmt 1: e4m3fn, 2: e5m2) widened to float32 in
 * registers as they are read, with keys and values scaled by k_scale and v_scale (1 for float32).
 *
 * Speed: decode attention is bound by reading the cache, so the loops keep what they reuse in
 * registers. Head dims of 64 and 128 get fixed-size copies of the inner loops (a query head and
 * an output head held in vector registers across the keys), one per cache format; the block table
 * is walked block by block, with no division per key.
 */
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_pool.h"
#include "simd.h"

typedef uint32_t u8 __attribute__((vector_size(32)));

/* Cache formats: float32, or fp8 bytes widened on the fly. An fp8 byte's sign, exponent and
 * mantissa bits are moved to float32's positions (sign-extended to 32 bits, shifted left so that
 * the mantissa's top bit lands on float32's, masked to sign | exponent | mantissa); read as a
 * float32 that is the value times 2^(bias difference), so one multiply by a power of two rebiases
 * it, exactly, subnormals included (NaN encodings are not preserved; the cache never holds them). */
enum { F32 = 0, E4M3 = 1, E5M2 = 2 };
#define FP8_SHIFT(FMT) ((FMT) == E4M3 ? 20 : 21)
#define FP8_MASK(FMT) ((FMT) == E4M3 ? 0x87F00000u : 0x8FE00000u)
#define FP8_REBIAS(FMT) ((FMT) == E4M3 ? 0x1p120f : 0x1p112f) /* 2^(127 - 7), 2^(127 - 15) */

/* Elements [offset, offset + 8) of the cache as float32. */
static inline __attribute__((always_inline)) v8 row8(const void *cache, int64_t offset, int FMT) {
    if (FMT == F32) return load8((const float *)cache + offset);
    const int8_t *p = (const int8_t *)cache + offset;
#ifdef __AVX2__
    u8 x = (u8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    u8 x;
    for (int i = 0; i < 8; i++) x[i] = (uint32_t)(int32_t)p[i];
#endif
    return (v8)((x << FP8_SHIFT(FMT)) & FP8_MASK(FMT)) * FP8_REBIAS(FMT);
}

/* Element `offset` of the cache as float32 (the same widening, one at a time). */
static inline float elem(const void *cache, int64_t offset, int fmt) {
    if (fmt == F32) return ((const float *)cache)[offset];
    const uint32_t bits = ((uint32_t)(int32_t)((const int8_t *)cache)[offset] << FP8_SHIFT(fmt)) & FP8_MASK(fmt);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * FP8_REBIAS(fmt);
}

/* One kind of scores and values loops: scores[s] = q . k_s * scale, and out = sum_s p[s] * v_s,
 * for the S keys / values of one request and KV head; D is the head dim (ignored where fixed). */
typedef void scores_fn(const float *q, const void *cache, const int64_t *table, int64_t S, int64_t bs, int64_t row,
                       int64_t head, int64_t D, float scale, float *scores);
typedef void values_fn(const float *p, const void *cache, const int64_t *table, int64_t S, int64_t bs, int64_t row,
                       int64_t head, int64_t D, float *out);

/* Head dims of 64 and 128: a query head (or an output head) held in registers across the keys. */
static inline __attribute__((always_inline)) void scores_fixed(const float *q, const void *cache,
                                                               const int64_t *table, int64_t S, int64_t bs,
                                                               int64_t row, int64_t head, float scale,
                                                               float *scores, const int DIM, const int FMT) {
    v8 qv[16];
    for (int j = 0; j < DIM / 8; j++) qv[j] = load8(q + 8 * j);
    for (int64_t s0 = 0; s0 < S; s0 += bs) {
        const int64_t n = S - s0 < bs ? S - s0 : bs, base = table[s0 / bs] * bs * row + head;
        for (int64_t i = 0; i < n; i++) {
            const int64_t k = base + i * row;
            v8 a0 = qv[0] * row8(cache, k, FMT), a1 = qv[1] * row8(cache, k + 8, FMT);
            for (int j = 2; j < DIM / 8; j += 2) {
                a0 += qv[j] * row8(cache, k + 8 * j, FMT);
                a1 += qv[j + 1] * row8(cache, k + 8 * j + 8, FMT);
            }
            scores[s0 + i] = hsum8(a0 + a1) * scale;
        }
    }
}

static inline __attribute__((always_inline)) void values_fixed(const float *p, const void *cache,
                                                               const int64_t *table, int64_t S, int64_t bs,
                                                               int64_t row, int64_t head, float *out,
                                                               const int DIM, const int FMT) {
    v8 o[16] = {0};
    for (int64_t s0 = 0; s0 < S; s0 += bs) {
        const int64_t n = S - s0 < bs ? S - s0 : bs, base = table[s0 / bs] * bs * row + head;
        for (int64_t i = 0; i < n; i++) {
            const float w = p[s0 + i];
            for (int j = 0; j < DIM / 8; j++) o[j] += w * row8(cache, base + i * row + 8 * j, FMT);
        }
    }
    for (int j = 0; j < DIM / 8; j++) store8(out + 8 * j, o[j]);
}

/* Any head dim, one element at a time. */
static void scores_any(const float *q, const void *cache, const int64_t *table, int64_t S, int64_t bs, int64_t row,
                       int64_t head, int64_t D, float scale, float *scores, int fmt) {
    for (int64_t s = 0; s < S; s++) {
        const int64_t k = table[s / bs] * bs * row + (s % bs) * row + head;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += q[d] * elem(cache, k + d, fmt);
        scores[s] = dot * scale;
    }
}

static void values_any(const float *p, const void *cache, const int64_t *table, int64_t S, int64_t bs, int64_t row,
                       int64_t head, int64_t D, float *out, int fmt) {
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const int64_t v = table[s / bs] * bs * row + (s % bs) * row + head;
        for (int64_t d = 0; d < D; d++) out[d] += p[s] * elem(cache, v + d, fmt);
    }
}

/* The loops of one head dim (64, 128 or 0: any) and cache format, compiled for them. */
#define LOOPS(DIM, FMT)                                                                                        \
    static void scores_##DIM##_##FMT(const float *q, const void *cache, const int64_t *table, int64_t S,        \
                                     int64_t bs, int64_t row, int64_t head, int64_t D, float scale,             \
                                     float *scores) {                                                           \
        if (DIM) scores_fixed(q, cache, table, S, bs, row, head, scale, scores, DIM, FMT);                     \
        else scores_any(q, cache, table, S, bs, row, head, D, scale, scores, FMT);                             \
    }                                                                                                           \
    static void values_##DIM##_##FMT(const float *p, const void *cache, const int64_t *table, int64_t S,        \
                                     int64_t bs, int64_t row, int64_t head, int64_t D, float *out) {           \
        if (DIM) values_fixed(p, cache, table, S, bs, row, head, out, DIM, FMT);                               \
        else values_any(p, cache, table, S, bs, row, head, D, out, FMT);                                       \
    }
#define FORMATS(DIM) LOOPS(DIM, F32) LOOPS(DIM, E4M3) LOOPS(DIM, E5M2)
FORMATS(64)
FORMATS(128)
FORMATS(0)
#define KINDS(KIND, DIM) {KIND##_##DIM##_F32, KIND##_##DIM##_E4M3, KIND##_##DIM##_E5M2}
static scores_fn *const SCORES[3][3] = {KINDS(scores, 64), KINDS(scores, 128), KINDS(scores, 0)};
static values_fn *const VALUES[3][3] = {KINDS(values, 64), KINDS(values, 128), KINDS(values, 0)};

/* In place: sc[s] <- softmax(sc)[s] * v_scale. */
static void softmax(float *sc, int64_t S, float v_scale) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s < S; s++) top = sc[s] > top ? sc[s] : top;
    for (int64_t s = 0; s < S; s++) sum += (sc[s] = expf(sc[s] - top));
    const float norm = v_scale / sum;
    for (int64_t s = 0; s < S; s++) sc[s] *= norm;
}

struct decode_args {
    const float *q;
    const void *k_cache, *v_cache;
    const int64_t *tables, *seq_lens;
    float *out;
    int64_t W, H, Hkv, D, bs;
    float scale, v_scale;
    scores_fn *scores;
    values_fn *values;
};

/* Work items [lo, hi): item i is request i / Hkv and its KV head i % Hkv, with the G query heads
 * that read it in turn (the head's rows stay in cache for the next). */
static void decode_items(void *ctx, int64_t lo, int64_t hi) {
    const struct decode_args *a = ctx;
    const int64_t D = a->D, G = a->H / a->Hkv, row = a->Hkv * D, bs = a->bs;
    int64_t longest = 0;
    for (int64_t i = lo; i < hi; i++) longest = a->seq_lens[i / a->Hkv] > longest ? a->seq_lens[i / a->Hkv] : longest;
    float *scores = malloc((size_t)(longest > 0 ? longest : 1) * sizeof(float));
    if (!scores) abort();
    for (int64_t i = lo; i < hi; i++) {
        const int64_t b = i / a->Hkv, head = (i % a->Hkv) * D, S = a->seq_lens[b];
        const int64_t *table = a->tables + b * a->W;
        for (int64_t h = (i % a->Hkv) * G; h < (i % a->Hkv + 1) * G; h++) {
            const float *qh = a->q + (b * a->H + h) * D;
            a->scores(qh, a->k_cache, table, S, bs, row, head, D, a->scale, scores);
            softmax(scores, S, a->v_scale);
            a->values(scores, a->v_cache, table, S, bs, row, head, D, a->out + (b * a->H + h) * D);
        }
    }
    free(scores);
}

void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *seq_lens, float *out, int64_t B, int64_t W, int64_t H, int64_t Hkv, int64_t D,
                  int64_t bs, float scale, int64_t fmt, float k_scale, float v_scale, int64_t threads) {
    const int dims = D == 64 ? 0 : D == 128 ? 1 : 2;
    struct decode_args a = {q,  k_cache, v_cache, tables, seq_lens, out, W, H, Hkv, D, bs, scale * k_scale, v_scale,
                            SCORES[dims][fmt], VALUES[dims][fmt]};
    parallel_for(B * Hkv, pool_chunk(B * Hkv, threads, 1), threads, decode_items, &a);
}
