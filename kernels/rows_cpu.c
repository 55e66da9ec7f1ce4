/* The row-wise ops between a Llama-family layer's projections on the CPU, threaded over rows
 * (cpu_pool.h): RMSNorm with the residual add, neox-style rotary in place, and SiLU-and-mul, over
 * float32 rows, or bfloat16 rows (fmt BF16) computed in float32 and rounded where torch's
 * bfloat16 ops round (the layers' torch code: each op's result is a bfloat16 tensor).
 *
 * The one-call decode step (decode_step_cpu.c) runs them between its kernels; rows_cpu.py hands
 * them the torch layers' tensors in every other float32 step. There torch's broadcasting ops
 * allocated and re-read their operands op by op: on a 2048-token prefill step of smol135, quiet,
 * the rotary, the norms and the activation took 0.40 s against the GEMMs' 3.6 s, and 0.20 s here
 * (benchmarks/rows_cpu.py); on a loaded machine torch's took 5.6 s and these 0.6 s.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_pool.h"
#include "simd.h"
#include "widen.h"

/* v rounded to bfloat16 (to nearest even, as torch), still as float32. */
static inline v8 round_bf16(v8 v) {
    u8 bits = (u8)v;
    const u8 nan = (u8)((bits & 0x7FFFFFFFu) > 0x7F800000u);
    bits = ((bits + 0x7FFFu + (bits >> 16 & 1u)) & ~nan) | ((bits | 0x400000u) & nan);
    return (v8)(bits & 0xFFFF0000u);
}

/* Elements [i, i + 8) of a row of format FMT (F32 or BF16) stored from float32 (rounded); row8
 * (widen.h) reads them. */
static inline __attribute__((always_inline)) void put8(void *p, int64_t i, v8 v, const int FMT) {
    if (FMT == F32) {
        store8((float *)p + i, v);
        return;
    }
    const u8 bits = (u8)round_bf16(v) >> 16;
    for (int j = 0; j < 8; j++) ((uint16_t *)p)[i + j] = (uint16_t)bits[j];
}
/* The same, one element at a time (rows whose length is not a multiple of 8); elem reads them. */
static inline void put1(void *p, int64_t i, float v, const int FMT) {
    if (FMT == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = to_bf16(v);
}
/* v rounded as format FMT holds it (float32: as it is). */
static inline v8 round8(v8 v, const int FMT) { return FMT == F32 ? v : round_bf16(v); }
static inline float round1(float v, const int FMT) {
    if (FMT == F32) return v;
    const uint16_t h = to_bf16(v);
    return elem(&h, 0, BF16);
}

/* out[t] = x'[t] / rms(x'[t]) * w, where x' = x + residual_in, also written to residual_out (which
 * may be residual_in), or x' = x without residual_in: the rows of H elements at element offset off.
 * In bfloat16 as RMSNorm's torch code: x' rounded, the normed row rounded before the weight, the
 * product rounded. */
static inline __attribute__((always_inline)) void norm_row(const void *x, const void *residual_in, void *residual_out,
                                                           const void *w, void *out, int64_t off, int64_t H, float eps,
                                                           const int FMT) {
    v8 sq8 = {0};
    float sq = 0.0f;
    int64_t d = 0;
    if (residual_in) {
        for (; d + 8 <= H; d += 8) {
            const v8 s = round8(row8(x, off + d, FMT) + row8(residual_in, off + d, FMT), FMT);
            put8(residual_out, off + d, s, FMT);
            sq8 += s * s;
        }
        for (; d < H; d++) {
            const float s = round1(elem(x, off + d, FMT) + elem(residual_in, off + d, FMT), FMT);
            put1(residual_out, off + d, s, FMT);
            sq += s * s;
        }
        x = residual_out;
    } else {
        for (; d + 8 <= H; d += 8) sq8 += row8(x, off + d, FMT) * row8(x, off + d, FMT);
        for (; d < H; d++) sq += elem(x, off + d, FMT) * elem(x, off + d, FMT);
    }
    const float inv = 1.0f / sqrtf((sq + hsum8(sq8)) / (float)H + eps);
    for (d = 0; d + 8 <= H; d += 8)
        put8(out, off + d, round8(row8(x, off + d, FMT) * inv, FMT) * row8(w, d, FMT), FMT);
    for (; d < H; d++) put1(out, off + d, round1(elem(x, off + d, FMT) * inv, FMT) * elem(w, d, FMT), FMT);
}

/* `heads` heads of D elements at x (element offset), rotated at one position: its cos_sin row
 * (float32) holds D / 2 cosines then D / 2 sines; each head's halves rotate together. In bfloat16
 * as the rotary's torch code: cos and sin rounded, then each product and each sum. */
static inline __attribute__((always_inline)) void rotate_row(void *x, int64_t off, int64_t heads, int64_t D,
                                                             const float *cos_sin, const int FMT) {
    const int64_t half = D / 2;
    const float *cos = cos_sin, *sin = cos_sin + half;
    for (int64_t h = 0; h < heads; h++) {
        const int64_t a = off + h * D, b = a + half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
            const v8 x1 = row8(x, a + i, FMT), x2 = row8(x, b + i, FMT);
            const v8 c = round8(load8(cos + i), FMT), s = round8(load8(sin + i), FMT);
            put8(x, a + i, round8(x1 * c, FMT) - round8(x2 * s, FMT), FMT);
            put8(x, b + i, round8(x2 * c, FMT) + round8(x1 * s, FMT), FMT);
        }
        for (; i < half; i++) {
            const float x1 = elem(x, a + i, FMT), x2 = elem(x, b + i, FMT);
            const float c = round1(cos[i], FMT), s = round1(sin[i], FMT);
            put1(x, a + i, round1(x1 * c, FMT) - round1(x2 * s, FMT), FMT);
            put1(x, b + i, round1(x2 * c, FMT) + round1(x1 * s, FMT), FMT);
        }
    }
}

/* a[i] = silu(g[i]) * g[I + i] for i < I (element offsets go and ao): one row of the gated MLP's
 * activation. In bfloat16 as SiluAndMul's torch code: silu's result rounded, then the product. */
static inline __attribute__((always_inline)) void silu_and_mul_row(const void *g, int64_t go, void *a, int64_t ao,
                                                                   int64_t I, const int FMT) {
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        const v8 x = row8(g, go + i, FMT);
        put8(a, ao + i, round8(x / (1.0f + exp8(-x)), FMT) * row8(g, go + I + i, FMT), FMT);
    }
    for (; i < I; i++) {
        const float x = elem(g, go + i, FMT);
        put1(a, ao + i, round1(x / (1.0f + expf(-x)), FMT) * elem(g, go + I + i, FMT), FMT);
    }
}

struct rows_args {
    const void *x, *residual_in, *w;
    void *residual_out, *out;
    const float *cos_sin;
    const int64_t *positions;
    int64_t width, stride, heads, D;
    float eps;
};

#define BY_FORMAT(NAME)                                                                      \
    static void NAME##_f32(void *ctx, int64_t lo, int64_t hi) { NAME(ctx, lo, hi, F32); }    \
    static void NAME##_bf16(void *ctx, int64_t lo, int64_t hi) { NAME(ctx, lo, hi, BF16); }

static inline __attribute__((always_inline)) void norm_rows(void *ctx, int64_t lo, int64_t hi, const int FMT) {
    const struct rows_args *a = ctx;
    for (int64_t t = lo; t < hi; t++)
        norm_row(a->x, a->residual_in, a->residual_out, a->w, a->out, t * a->width, a->width, a->eps, FMT);
}

static inline __attribute__((always_inline)) void rotate_rows(void *ctx, int64_t lo, int64_t hi, const int FMT) {
    const struct rows_args *a = ctx;
    for (int64_t t = lo; t < hi; t++)
        rotate_row(a->out, t * a->stride, a->heads, a->D, a->cos_sin + a->positions[t] * a->D, FMT);
}

static inline __attribute__((always_inline)) void silu_rows(void *ctx, int64_t lo, int64_t hi, const int FMT) {
    const struct rows_args *a = ctx;
    for (int64_t t = lo; t < hi; t++) silu_and_mul_row(a->x, t * 2 * a->width, a->out, t * a->width, a->width, FMT);
}
BY_FORMAT(norm_rows)
BY_FORMAT(rotate_rows)
BY_FORMAT(silu_rows)

/* Rows per chunk: about 64 KB of floats, so that a small call runs on the caller alone. */
static int64_t rows_chunk(int64_t T, int64_t width, int64_t threads) {
    const int64_t least = 16384 / (width > 0 ? width : 1) + 1, chunk = pool_chunk(T, threads, 1);
    return chunk > least ? chunk : least;
}

/* x, out [T, H]; residual_in, residual_out [T, H] or both NULL; w [H]: out = norm(x (+ residual_in))
 * * w, the sum also to residual_out. All float32 (fmt F32) or all bfloat16 (BF16). */
void rms_norm(const void *x, const void *residual_in, void *residual_out, const void *w, void *out, int64_t T,
              int64_t H, float eps, int64_t fmt, int64_t threads) {
    struct rows_args a = {x, residual_in, w, residual_out, out, NULL, NULL, H, H, 0, 0, eps};
    parallel_for(T, rows_chunk(T, H, threads), threads, fmt == BF16 ? norm_rows_bf16 : norm_rows_f32, &a);
}

/* x: T rows `stride` elements apart, each `heads` heads of D elements at its start (float32, or
 * bfloat16 with fmt BF16), rotated in place at positions [T] by cos_sin [max_position, D] (float32). */
void rotary(void *x, int64_t stride, int64_t heads, int64_t D, const int64_t *positions, const float *cos_sin,
            int64_t T, int64_t fmt, int64_t threads) {
    struct rows_args a = {NULL, NULL, NULL, NULL, x, cos_sin, positions, heads * D, stride, heads, D, 0.0f};
    parallel_for(T, rows_chunk(T, heads * D, threads), threads, fmt == BF16 ? rotate_rows_bf16 : rotate_rows_f32, &a);
}

/* g [T, 2 I] (gate then up) -> out [T, I] = silu(gate) * up, both float32 or both bfloat16 (fmt). */
void silu_and_mul(const void *g, void *out, int64_t T, int64_t I, int64_t fmt, int64_t threads) {
    struct rows_args a = {g, NULL, NULL, NULL, out, NULL, NULL, I, 2 * I, 0, 0, 0.0f};
    parallel_for(T, rows_chunk(T, 2 * I, threads), threads, fmt == BF16 ? silu_rows_bf16 : silu_rows_f32, &a);
}
