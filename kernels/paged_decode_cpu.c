/* Paged attention for float32 query rows on the CPU: each row (a decoding request's token, or one
 * token of a prompt chunk or of a speculative verification) attends to the context up to itself,
 * its keys and values read in place from the paged cache (no gather copy), each KV head's rows
 * read once for all the query heads that share it (GQA). Built and called by paged_decode_cpu.py;
 * its torch reference is the gather + SDPA path of services/worker/layers/attention_torch.py.
 *
 * q [T, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; tables [B, W] block ids; row t
 * reads table row table_rows[t] (t where table_rows is NULL) up to seq_lens[t] tokens; out
 * [T, H, D]. The rows, whole or by KV head, are split over `threads` threads (cpu_pool.h).
 * The cache holds float32 (fmt 0), or fp8 bytes (fmt 1: e4m3fn, 2: e5m2) or bfloat16 (fmt 3)
 * widened to float32 as they are read, fp8 keys and values scaled by k_scale and v_scale (1 for
 * the others).
 *
 * Speed: decode attention is bound by reading the cache. With enough rows to share out, a row's
 * blocks are read in order, each once for all its KV heads, and prefetched 64 KB ahead (reading
 * ahead, below); eight keys' dot products finish in one reduction, the softmax's exp is
 * vectorized, and the output heads stay in registers across a block's rows. Consecutive rows
 * reading one table row (a prompt chunk's tokens) go in tiles of TILE_ROWS, each block read once
 * per tile: causal attention with no padding and no mask, faster
 * than SDPA's masked batch on CPU for short contexts (attention_torch.py sends chunks of long ones,
 * whose scores outgrow the caches here, to SDPA).
 * Head dims of 64 and 128 get fixed-size copies of the loops, one per cache format.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_pool.h"
#include "widen.h"
#include "simd.h"

/* The sums of a[0..7]'s lanes, lane i holding a[i]'s: three rounds of pairwise adds (vhaddps), so
 * eight keys' dot products cost about one instruction each to finish. */
static inline v8 hadd8(v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
static inline v8 reduce8(const v8 *a) {
    const v8 u0 = hadd8(hadd8(a[0], a[1]), hadd8(a[2], a[3])), u1 = hadd8(hadd8(a[4], a[5]), hadd8(a[6], a[7]));
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* n rows of `width` floats (KV heads side by side) in one block as float32 rows `*stride` floats
 * apart: the cache itself for float32, else widened into buf [n, width]. */
static inline __attribute__((always_inline)) const float *block_rows(const void *cache, int64_t base, int64_t n,
                                                                     int64_t row, int64_t width, float *buf,
                                                                     int64_t *stride, const int FMT) {
    if (FMT == F32) {
        *stride = row;
        return (const float *)cache + base;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < width; j += 8) store8(buf + i * width + j, row8(cache, base + i * row + j, FMT));
    *stride = width;
    return buf;
}

/* Reading ahead: the blocks a call of decode_items reads, in order (each work item's key blocks,
 * then its value blocks), with a cursor AHEAD_BYTES in front of the block being computed. Each
 * block computed moves the cursor on by as many bytes, a share at a time as its rows (or one row's
 * heads) are computed, prefetching the lines it passes into L2, one line per 64 bytes. A block's
 * rows sit at pages of their own, where the hardware prefetcher starts over, so without this each
 * block waits for memory. Into L2, not L1: prefetches into L1 stall on L1's few outstanding
 * misses. In shares, not a block at a time: a block's 192 prefetches in a row stalled the same way
 * until memory answered, so the block's compute and the reads ahead ran one after the other.
 * Measured on a 2-core AMD EPYC, float32, every layer's cache from memory
 * (benchmarks/decode_attention_cpu.py): a block at a time, against the next block into L1, 1.19x
 * at 64 requests x 320 tokens, 1.15x at 128 x 256, 1.30x at 16 x 1024, 1.58x at 4 x 2048; in
 * shares, against a block at a time, 1.45x at 64 x 320 and 1.41x at 16 x 1024 (about 21 GB/s,
 * near a plain read of the same random blocks). 16 KB to 128 KB ahead did about as well as 64.
 * The cursor moves by pointers and counters: against one that divided per line, 1.15x at 64 x 320,
 * 1.09x at 128 x 256, 1.16x at 16 x 1024 (about 27 GB/s). */
#define AHEAD_BYTES (64 * 1024)
struct decode_args;
struct ahead {
    const struct decode_args *a;
    int64_t item, hi, pass, blk, nblk, head; /* at block blk of pass (0 keys, 1 values) of item */
    const int64_t *table;
    const char *next; /* the next line to prefetch: line j of row i of block blk */
    int64_t i, j;
    int64_t owed; /* bytes the cursor still has to move on */
};
static void ahead_enter(struct ahead *c);
static void ahead_move(struct ahead *c, int64_t bytes);
/* A block's share of reading ahead per call: its bytes spread over its R rows (one row: its heads). */
static inline int64_t ahead_share(int64_t bytes, int64_t R, int64_t heads) {
    return bytes / (R > 1 ? R : heads) + 1;
}

/* A tile: R query rows that read the same block table (one decoding row, or consecutive tokens of
 * one request's chunk), row r seeing its first S[r] keys; Smax is the largest S[r]. Row r's query
 * heads for KV heads [head / D, head / D + nkv) are q + r * qstride, [nkv * G, D]; its scores are
 * scores + r * nkv * G * Smax, [nkv * G, Smax]. Each block's rows are read from memory once per tile.
 *
 * Head dims of 64 and 128: scores = q . k * scale, eight keys at a time per query head, the block's
 * rows in L1 across the tile's rows and heads. */
static inline __attribute__((always_inline)) void scores_fixed(const float *q, int64_t qstride, const int64_t *S,
                                                               int64_t R, int64_t Smax, int64_t nkv, int64_t G,
                                                               const void *cache, const int64_t *table, int64_t bs,
                                                               int64_t row, int64_t head, float scale,
                                                               float *scores, float *buf, struct ahead *c,
                                                               const int DIM, const int FMT) {
    for (int64_t s0 = 0; s0 < Smax; s0 += bs) {
        const int64_t n = Smax - s0 < bs ? Smax - s0 : bs;
        int64_t stride;
        const float *rows = block_rows(cache, table[s0 / bs] * bs * row + head, n, row, nkv * DIM, buf, &stride, FMT);
        const int64_t share = ahead_share(n * nkv * DIM * ESIZE(FMT), R, nkv * G);
        for (int64_t r = 0; r < R; r++) {
            const int64_t nr = S[r] - s0 < n ? S[r] - s0 : n;
            if (R > 1) ahead_move(c, share);
            for (int64_t h = 0; h < nkv * G; h++) {
                if (R == 1) ahead_move(c, share);
                if (nr <= 0) continue;
                const float *k = rows + h / G * DIM, *qh = q + r * qstride + h * DIM;
                float *sc = scores + (r * nkv * G + h) * Smax + s0;
                int64_t i = 0;
                for (; i + 8 <= nr; i += 8) {
                    v8 acc[8] = {0};
                    for (int j = 0; j < DIM; j += 8) {
                        const v8 qj = load8(qh + j);
                        for (int u = 0; u < 8; u++) acc[u] += qj * load8(k + (i + u) * stride + j);
                    }
                    store8(sc + i, reduce8(acc) * scale);
                }
                for (; i < nr; i++) {
                    v8 acc = {0};
                    for (int j = 0; j < DIM; j += 8) acc += load8(qh + j) * load8(k + i * stride + j);
                    sc[i] = hsum8(acc) * scale;
                }
            }
        }
    }
}

/* A tile's outputs, row r's at out + r * ostride, [nkv * G, DIM] = p (laid out as the scores) times
 * the values, block by block: each head's output, 64 floats at a time, in registers across a
 * block's rows, which stay in L1 across the tile's rows and heads. */
static inline __attribute__((always_inline)) void values_fixed(const float *p, const int64_t *S, int64_t R,
                                                               int64_t Smax, int64_t nkv, int64_t G,
                                                               const void *cache, const int64_t *table, int64_t bs,
                                                               int64_t row, int64_t head, float *out,
                                                               int64_t ostride, float *buf, struct ahead *ahead,
                                                               const int DIM, const int FMT) {
    for (int64_t r = 0; r < R; r++) memset(out + r * ostride, 0, (size_t)(nkv * G * DIM) * sizeof(float));
    for (int64_t s0 = 0; s0 < Smax; s0 += bs) {
        const int64_t n = Smax - s0 < bs ? Smax - s0 : bs;
        int64_t stride;
        const float *rows = block_rows(cache, table[s0 / bs] * bs * row + head, n, row, nkv * DIM, buf, &stride, FMT);
        const int64_t share = ahead_share(n * nkv * DIM * ESIZE(FMT), R, nkv * G);
        for (int64_t r = 0; r < R; r++) {
            const int64_t nr = S[r] - s0 < n ? S[r] - s0 : n;
            if (R > 1) ahead_move(ahead, share);
            for (int64_t h = 0; h < nkv * G; h++) {
                if (R == 1) ahead_move(ahead, share);
                if (nr <= 0) continue;
                for (int c = 0; c < DIM; c += 64) {
                    const float *v = rows + h / G * DIM + c, *ph = p + (r * nkv * G + h) * Smax + s0;
                    float *oh = out + r * ostride + h * DIM + c;
                    v8 o[8];
                    for (int j = 0; j < 8; j++) o[j] = load8(oh + 8 * j);
                    for (int64_t i = 0; i < nr; i++)
                        for (int j = 0; j < 8; j++) o[j] += ph[i] * load8(v + i * stride + 8 * j);
                    for (int j = 0; j < 8; j++) store8(oh + 8 * j, o[j]);
                }
            }
        }
    }
}

/* Any head dim, one query head and one element at a time. */
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

/* One kind of scores and values loops over a tile (see scores_fixed): scores = q . k * scale, and
 * out = p times the values. buf: room for a block's rows as float32. */
typedef void scores_fn(const float *q, int64_t qstride, const int64_t *S, int64_t R, int64_t Smax, int64_t nkv,
                       int64_t G, const void *cache, const int64_t *table, int64_t bs, int64_t row, int64_t head,
                       int64_t D, float scale, float *scores, float *buf, struct ahead *ahead);
typedef void values_fn(const float *p, const int64_t *S, int64_t R, int64_t Smax, int64_t nkv, int64_t G,
                       const void *cache, const int64_t *table, int64_t bs, int64_t row, int64_t head, int64_t D,
                       float *out, int64_t ostride, float *buf, struct ahead *ahead);

/* The loops of one head dim (64, 128 or 0: any, row by row and head by head) and cache format. */
#define LOOPS(DIM, FMT)                                                                                         \
    static void scores_##DIM##_##FMT(const float *q, int64_t qstride, const int64_t *S, int64_t R, int64_t Smax, \
                                     int64_t nkv, int64_t G, const void *cache, const int64_t *table, int64_t bs, \
                                     int64_t row, int64_t head, int64_t D, float scale, float *scores,           \
                                     float *buf, struct ahead *ahead) {                                          \
        if (DIM) {                                                                                               \
            scores_fixed(q, qstride, S, R, Smax, nkv, G, cache, table, bs, row, head, scale, scores, buf, ahead, \
                         DIM, FMT);                                                                              \
            return;                                                                                              \
        }                                                                                                        \
        for (int64_t r = 0; r < R; r++)                                                                          \
            for (int64_t h = 0; h < nkv * G; h++)                                                                \
                scores_any(q + r * qstride + h * D, cache, table, S[r], bs, row, head + h / G * D, D, scale,     \
                           scores + (r * nkv * G + h) * Smax, FMT);                                              \
    }                                                                                                            \
    static void values_##DIM##_##FMT(const float *p, const int64_t *S, int64_t R, int64_t Smax, int64_t nkv,     \
                                     int64_t G, const void *cache, const int64_t *table, int64_t bs, int64_t row, \
                                     int64_t head, int64_t D, float *out, int64_t ostride, float *buf,          \
                                     struct ahead *ahead) {                                                      \
        if (DIM) {                                                                                               \
            values_fixed(p, S, R, Smax, nkv, G, cache, table, bs, row, head, out, ostride, buf, ahead, DIM, FMT); \
            return;                                                                                              \
        }                                                                                                        \
        for (int64_t r = 0; r < R; r++)                                                                          \
            for (int64_t h = 0; h < nkv * G; h++)                                                                \
                values_any(p + (r * nkv * G + h) * Smax, cache, table, S[r], bs, row, head + h / G * D, D,       \
                           out + r * ostride + h * D, FMT);                                                      \
    }
#define FORMATS(DIM) LOOPS(DIM, F32) LOOPS(DIM, E4M3) LOOPS(DIM, E5M2) LOOPS(DIM, BF16)
FORMATS(64)
FORMATS(128)
FORMATS(0)
#define KINDS(KIND, DIM) {KIND##_##DIM##_F32, KIND##_##DIM##_E4M3, KIND##_##DIM##_E5M2, KIND##_##DIM##_BF16}
static scores_fn *const SCORES[3][4] = {KINDS(scores, 64), KINDS(scores, 128), KINDS(scores, 0)};
static values_fn *const VALUES[3][4] = {KINDS(values, 64), KINDS(values, 128), KINDS(values, 0)};

/* In place: sc[s] <- softmax(sc)[s] * v_scale. */
static void softmax(float *sc, int64_t S, float v_scale) {
    float top = -INFINITY, sum = 0.0f;
    int64_t s = 0;
    v8 top8 = {0}, sum8 = {0};
    if (S >= 8) {
        top8 = load8(sc);
        for (s = 8; s + 8 <= S; s += 8) {
            const v8 x = load8(sc + s);
            top8 = (v8)(((vi8)top8 & (vi8)(top8 >= x)) | ((vi8)x & (vi8)(top8 < x)));
        }
        for (int i = 0; i < 8; i++) top = top8[i] > top ? top8[i] : top;
    }
    for (; s < S; s++) top = sc[s] > top ? sc[s] : top;
    for (s = 0; s + 8 <= S; s += 8) {
        const v8 e = exp8(load8(sc + s) - top);
        store8(sc + s, e);
        sum8 += e;
    }
    for (; s < S; s++) sum += (sc[s] = expf(sc[s] - top));
    const float norm = v_scale / (sum + hsum8(sum8));
    for (s = 0; s < S; s++) sc[s] *= norm;
}

struct decode_args {
    const float *q;
    const void *k_cache, *v_cache;
    const int64_t *tables, *table_rows, *seq_lens;
    const int64_t *tiles; /* tile t is rows [tiles[t], tiles[t + 1]) */
    float *out;
    int64_t W, H, Hkv, D, bs, nkv; /* nkv: the KV heads of one work item */
    int64_t esize;                 /* bytes of a cache element */
    float scale, v_scale;
    scores_fn *scores;
    values_fn *values;
};

/* The longest context among tile t's rows. */
static int64_t tile_len(const struct decode_args *a, int64_t t) {
    int64_t Smax = 0;
    for (int64_t r = a->tiles[t]; r < a->tiles[t + 1]; r++) Smax = a->seq_lens[r] > Smax ? a->seq_lens[r] : Smax;
    return Smax;
}

/* The cursor at row 0 of block blk of its item's pass. */
static void ahead_block(struct ahead *c) {
    const struct decode_args *a = c->a;
    const char *cache = c->pass ? a->v_cache : a->k_cache;
    c->next = cache + (c->table[c->blk] * a->bs * a->Hkv * a->D + c->head) * a->esize;
    c->i = c->j = 0;
}

/* The cursor at the first block of its item's pass (an item past hi: the cursor has stopped). */
static void ahead_enter(struct ahead *c) {
    const struct decode_args *a = c->a;
    if (c->item >= c->hi) return;
    const int64_t per = a->Hkv / a->nkv, t = c->item / per, r0 = a->tiles[t];
    c->table = a->tables + (a->table_rows ? a->table_rows[r0] : r0) * a->W;
    c->nblk = (tile_len(a, t) + a->bs - 1) / a->bs;
    c->head = c->item % per * a->nkv * a->D;
    c->blk = 0;
    if (c->nblk) ahead_block(c);
}

/* Move the cursor on by `bytes`, prefetching into L2 a line of the item's KV heads' rows for each
 * 64 bytes: a cursor of pointers and counters, since it runs once per line read (integer divisions
 * here cost more than the line's dot products). */
static void ahead_move(struct ahead *c, int64_t bytes) {
    const struct decode_args *a = c->a;
    const int64_t row = a->Hkv * a->D * a->esize, per_row = (a->nkv * a->D * a->esize + 63) / 64;
    for (c->owed += bytes; c->owed > 0 && c->item < c->hi;) {
        if (c->blk == c->nblk) { /* the item's pass is done: its values next, or the next item */
            c->pass ^= 1;
            c->item += !c->pass;
            ahead_enter(c);
            continue;
        }
        __builtin_prefetch(c->next + c->j * 64, 0, 1);
        c->owed -= 64;
        if (++c->j == per_row) {
            c->j = 0;
            c->next += row;
            if (++c->i == a->bs && ++c->blk < c->nblk) ahead_block(c);
        }
    }
}

/* Work items [lo, hi): item i is tile i / per and its KV heads [i % per * nkv, + nkv), where
 * per = Hkv / nkv items share a tile, with the G query heads each KV head serves. */
static void decode_items(void *ctx, int64_t lo, int64_t hi) {
    const struct decode_args *a = ctx;
    const int64_t D = a->D, G = a->H / a->Hkv, row = a->Hkv * D, bs = a->bs, nkv = a->nkv, per = a->Hkv / nkv;
    int64_t room = 1; /* the largest tile's scores: rows x longest context */
    for (int64_t i = lo; i < hi; i++) {
        const int64_t t = i / per, r0 = a->tiles[t], R = a->tiles[t + 1] - r0;
        for (int64_t r = r0; r < r0 + R; r++) room = R * a->seq_lens[r] > room ? R * a->seq_lens[r] : room;
    }
    float *scores = malloc((size_t)(nkv * G * room + bs * nkv * D) * sizeof(float));
    if (!scores) abort();
    float *buf = scores + nkv * G * room;
    struct ahead ahead = {.a = a, .item = lo, .hi = hi};
    ahead_enter(&ahead);
    ahead_move(&ahead, AHEAD_BYTES);
    for (int64_t i = lo; i < hi; i++) {
        const int64_t t = i / per, kv = i % per * nkv, r0 = a->tiles[t], R = a->tiles[t + 1] - r0, Smax = tile_len(a, t);
        const int64_t *S = a->seq_lens + r0, *table = a->tables + (a->table_rows ? a->table_rows[r0] : r0) * a->W;
        const float *q = a->q + (r0 * a->H + kv * G) * D;
        a->scores(q, a->H * D, S, R, Smax, nkv, G, a->k_cache, table, bs, row, kv * D, D, a->scale, scores, buf,
                  &ahead);
        for (int64_t r = 0; r < R; r++)
            for (int64_t h = 0; h < nkv * G; h++) softmax(scores + (r * nkv * G + h) * Smax, S[r], a->v_scale);
        a->values(scores, S, R, Smax, nkv, G, a->v_cache, table, bs, row, kv * D, D, a->out + (r0 * a->H + kv * G) * D,
                  a->H * D, buf, &ahead);
    }
    free(scores);
}

#define TILE_ROWS 16 /* consecutive rows of one request taken together */

void paged_decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                  const int64_t *table_rows, const int64_t *seq_lens, float *out, int64_t B, int64_t W, int64_t H,
                  int64_t Hkv, int64_t D, int64_t bs, float scale, int64_t fmt, float k_scale, float v_scale,
                  int64_t threads) {
    const int dims = D == 64 ? 0 : D == 128 ? 1 : 2;
    /* tiles: runs of up to TILE_ROWS rows reading the same table row */
    int64_t *tiles = malloc((size_t)(B + 1) * sizeof(int64_t)), count = 0;
    if (!tiles) abort();
    for (int64_t b = 0; b < B; b++)
        if (!count || !table_rows || table_rows[b] != table_rows[b - 1] || b - tiles[count - 1] == TILE_ROWS)
            tiles[count++] = b;
    tiles[count] = B;
    /* whole tiles when there are enough to share out (each block's rows then read in order, once),
     * else a tile's KV heads apart */
    const int64_t nkv = count >= 8 * threads ? Hkv : 1, items = count * (Hkv / nkv);
    struct decode_args a = {q, k_cache, v_cache, tables, table_rows, seq_lens, tiles, out, W, H, Hkv, D, bs, nkv,
                            ESIZE(fmt), scale * k_scale, v_scale, SCORES[dims][fmt], VALUES[dims][fmt]};
    parallel_for(items, pool_chunk(items, threads, 1), threads, decode_items, &a);
    free(tiles);
}
