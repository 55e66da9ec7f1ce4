/* Weight-only int8 linear for a few rows on the CPU (W8A16 with float32 activations):
 * y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]). Decode is bound by streaming the
 * weights from memory, and int8 weights are a quarter of float32's bytes. As in f32_linear_cpu.c,
 * each block of 4 weight rows is read from memory once and used for every row of x, 3 rows at a
 * time: 8 weights at a time are widened int8 -> float32 in registers, and each widened vector
 * serves the 3 x rows of the tile; the block after next is prefetched meanwhile. The row's scale
 * is applied once per output. Built and called by int8_linear_cpu.py; its torch reference
 * dequantizes the weight and runs F.linear.
 *
 * x [M, K] float32; w [N, K] int8; scale [N]; bias [N] or NULL; y [M, N]; K a multiple of 8. The
 * blocks of output columns are split over `threads` threads (cpu_pool.h).
 */
#include <stdint.h>
#include <string.h>

#include "cpu_pool.h"
#include "simd.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

/* 8 int8 -> 8 float32. GCC 12 scalarizes __builtin_convertvector from 8 int8 to 8 float (byte by
 * byte): with AVX2 it is one sign-extending load and one conversion. */
static inline v8 widen8(const int8_t *p) {
#ifdef __AVX2__
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    typedef int8_t q8 __attribute__((vector_size(8)));
    q8 q;
    memcpy(&q, p, sizeof q);
    return __builtin_convertvector(q, v8);
#endif
}

/* y[m0 : m0 + MR, n0 : n0 + NR]; inlined with constant MR <= 3, NR <= 4, so the MR x NR
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_q8(const float *x, const int8_t *w, const float *scale,
                                                       const float *bias, float *y, int64_t K, int64_t N,
                                                       int64_t m0, int64_t n0, int MR, int NR) {
    v8 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = (v8){0};
    const float *xr = x + m0 * K;
    const int8_t *wr = w + n0 * K;
    for (int64_t k = 0; k < K; k += 8) {
        v8 wv[4], xv[3];
        for (int j = 0; j < NR; j++) wv[j] = widen8(wr + j * K + k);
        if ((k & 63) == 0)  /* one prefetch per 64-byte line of each row */
            for (int j = 0; j < NR; j++) __builtin_prefetch(wr + (2 * NR + j) * K + k, 0, 1);
        for (int i = 0; i < MR; i++) xv[i] = load8(xr + i * K + k);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] += xv[i] * wv[j];
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            y[(m0 + i) * N + n0 + j] = hsum8(acc[i][j]) * scale[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
}

/* Every row of x against weight rows [n, n + NR). */
#define ALL_ROWS_Q8(NR)                                                                \
    do {                                                                               \
        int64_t m = 0;                                                                 \
        for (; m + 3 <= M; m += 3) tile_q8(x, w, scale, bias, y, K, N, m, n, 3, NR);   \
        if (M - m == 2) tile_q8(x, w, scale, bias, y, K, N, m, n, 2, NR);              \
        else if (M - m == 1) tile_q8(x, w, scale, bias, y, K, N, m, n, 1, NR);         \
    } while (0)

struct q8_args {
    const float *x;
    const int8_t *w;
    const float *scale, *bias;
    float *y;
    int64_t M, K, N;
};

/* Output columns [lo, hi): blocks of 4 weight rows, then single rows. */
static void q8_columns(void *ctx, int64_t lo, int64_t hi) {
    const struct q8_args *a = ctx;
    const float *x = a->x, *scale = a->scale, *bias = a->bias;
    const int8_t *w = a->w;
    float *y = a->y;
    const int64_t M = a->M, K = a->K, N = a->N;
    int64_t n = lo;
    for (; n + 4 <= hi; n += 4) ALL_ROWS_Q8(4);
    for (; n < hi; n++) ALL_ROWS_Q8(1);
}

void int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                 int64_t K, int64_t N, int64_t threads) {
    struct q8_args a = {x, w, scale, bias, y, M, K, N};
    parallel_for(N, pool_chunk(N, threads, 4), threads, q8_columns, &a);
}

/* The weight dequantized, out[n, k] = w[n, k] * scale[n] (what F.linear runs on past a few rows of
 * x): one pass over the weights on the kernels' threads, where torch's convert-then-scale makes two. */
struct dequantize_args {
    const int8_t *w;
    const float *scale;
    float *out;
    int64_t K;
};

static void dequantize_rows(void *ctx, int64_t lo, int64_t hi) {
    const struct dequantize_args *a = ctx;
    for (int64_t n = lo; n < hi; n++) {
        const v8 s = (v8){0} + a->scale[n];
        for (int64_t k = 0; k < a->K; k += 8) {
            const v8 v = widen8(a->w + n * a->K + k) * s;
            memcpy(a->out + n * a->K + k, &v, sizeof v);
        }
    }
}

void int8_dequantize(const int8_t *w, const float *scale, float *out, int64_t N, int64_t K, int64_t threads) {
    struct dequantize_args a = {w, scale, out, K};
    parallel_for(N, pool_chunk(N, threads, 1), threads, dequantize_rows, &a);
}
