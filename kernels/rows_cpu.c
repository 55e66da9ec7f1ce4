/* The row-wise float32 ops between a Llama-family layer's projections on the CPU, threaded over
 * rows (cpu_pool.h): RMSNorm with the residual add, neox-style rotary in place, and SiLU-and-mul.
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

/* out[t] = x'[t] / rms(x'[t]) * w, where x' = x + residual_in, also written to residual_out (which
 * may be residual_in), or x' = x without residual_in. Rows of H floats, contiguous. */
static void norm_row(const float *x, const float *residual_in, float *residual_out, const float *w, float *out,
                     int64_t H, float eps) {
    v8 sq8 = {0};
    float sq = 0.0f;
    int64_t d = 0;
    if (residual_in) {
        for (; d + 8 <= H; d += 8) {
            const v8 s = load8(x + d) + load8(residual_in + d);
            store8(residual_out + d, s);
            sq8 += s * s;
        }
        for (; d < H; d++) {
            residual_out[d] = x[d] + residual_in[d];
            sq += residual_out[d] * residual_out[d];
        }
        x = residual_out;
    } else {
        for (; d + 8 <= H; d += 8) sq8 += load8(x + d) * load8(x + d);
        for (; d < H; d++) sq += x[d] * x[d];
    }
    const float inv = 1.0f / sqrtf((sq + hsum8(sq8)) / (float)H + eps);
    for (d = 0; d + 8 <= H; d += 8) store8(out + d, load8(x + d) * inv * load8(w + d));
    for (; d < H; d++) out[d] = x[d] * inv * w[d];
}

/* `heads` heads of D floats at x, rotated at one position: its cos_sin row holds D / 2 cosines
 * then D / 2 sines; each head's halves rotate together. */
static void rotate_row(float *x, int64_t heads, int64_t D, const float *cos_sin) {
    const int64_t half = D / 2;
    const float *cos = cos_sin, *sin = cos_sin + half;
    for (int64_t h = 0; h < heads; h++) {
        float *a = x + h * D, *b = a + half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
            const v8 x1 = load8(a + i), x2 = load8(b + i), c = load8(cos + i), s = load8(sin + i);
            store8(a + i, x1 * c - x2 * s);
            store8(b + i, x2 * c + x1 * s);
        }
        for (; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/* a[i] = silu(g[i]) * g[I + i] for i < I: one row of the gated MLP's activation. */
static void silu_and_mul_row(const float *g, float *a, int64_t I) {
    const float *u = g + I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        const v8 x = load8(g + i);
        store8(a + i, x / (1.0f + exp8(-x)) * load8(u + i));
    }
    for (; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

struct rows_args {
    const float *x, *residual_in, *w;
    float *residual_out, *out;
    const int64_t *positions;
    int64_t width, stride, heads, D;
    float eps;
};

static void norm_rows(void *ctx, int64_t lo, int64_t hi) {
    const struct rows_args *a = ctx;
    const int64_t H = a->width;
    for (int64_t t = lo; t < hi; t++)
        norm_row(a->x + t * H, a->residual_in ? a->residual_in + t * H : NULL,
                 a->residual_in ? a->residual_out + t * H : NULL, a->w, a->out + t * H, H, a->eps);
}

static void rotate_rows(void *ctx, int64_t lo, int64_t hi) {
    const struct rows_args *a = ctx;
    for (int64_t t = lo; t < hi; t++) rotate_row(a->out + t * a->stride, a->heads, a->D, a->w + a->positions[t] * a->D);
}

static void silu_rows(void *ctx, int64_t lo, int64_t hi) {
    const struct rows_args *a = ctx;
    for (int64_t t = lo; t < hi; t++) silu_and_mul_row(a->x + t * 2 * a->width, a->out + t * a->width, a->width);
}

/* Rows per chunk: about 64 KB of floats, so that a small call runs on the caller alone. */
static int64_t rows_chunk(int64_t T, int64_t width, int64_t threads) {
    const int64_t least = 16384 / (width > 0 ? width : 1) + 1, chunk = pool_chunk(T, threads, 1);
    return chunk > least ? chunk : least;
}

/* x, out [T, H]; residual_in, residual_out [T, H] or both NULL; w [H]: out = norm(x (+ residual_in))
 * * w, the sum also to residual_out. */
void rms_norm(const float *x, const float *residual_in, float *residual_out, const float *w, float *out, int64_t T,
              int64_t H, float eps, int64_t threads) {
    struct rows_args a = {x, residual_in, w, residual_out, out, NULL, H, H, 0, 0, eps};
    parallel_for(T, rows_chunk(T, H, threads), threads, norm_rows, &a);
}

/* x: T rows `stride` floats apart, each `heads` heads of D floats at its start, rotated in place at
 * positions [T] by cos_sin [max_position, D]. */
void rotary(float *x, int64_t stride, int64_t heads, int64_t D, const int64_t *positions, const float *cos_sin,
            int64_t T, int64_t threads) {
    struct rows_args a = {NULL, NULL, cos_sin, NULL, x, positions, heads * D, stride, heads, D, 0.0f};
    parallel_for(T, rows_chunk(T, heads * D, threads), threads, rotate_rows, &a);
}

/* g [T, 2 I] (gate then up) -> out [T, I] = silu(gate) * up. */
void silu_and_mul(const float *g, float *out, int64_t T, int64_t I, int64_t threads) {
    struct rows_args a = {g, NULL, NULL, NULL, out, NULL, I, 2 * I, 0, 0, 0.0f};
    parallel_for(T, rows_chunk(T, 2 * I, threads), threads, silu_rows, &a);
}
