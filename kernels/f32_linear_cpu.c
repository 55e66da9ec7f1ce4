/* float32 linear for a few rows on the CPU (decode): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 * A decode step multiplies a handful of rows by every weight, once: it is bound by streaming the
 * weights from memory, and BLAS sgemm, tuned for large matrices, loses time at these shapes. Here
 * each block of 3 weight rows is read from memory once and used for every row of x, 4 rows at a
 * time: 4 x 3 dot products run side by side, so each vector loaded serves 3 or 4 of them, and the
 * block after next is prefetched meanwhile. 4 x 3 accumulators, 3 weight vectors and one x vector
 * fill AVX2's 16 registers exactly (3 x 4 spilled: 1.2-1.5x slower at 8 and 16 rows). Built and called by f32_linear_cpu.py; its torch
 * reference is F.linear.
 *
 * x [M, K]; w [N, K]; bias [N] or NULL; y [M, N]; K a multiple of 8. The output columns are split
 * over `threads` threads (cpu_pool.h).
 */
#include <stdint.h>

#include "cpu_pool.h"
#include "simd.h"

/* y[m0 : m0 + MR, n0 : n0 + NR]; inlined with constant MR <= 4, NR <= 3, so the MR x NR
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *bias, float *y,
                                                       int64_t K, int64_t N, int64_t m0, int64_t n0, int MR, int NR) {
    v8 acc[4][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = (v8){0};
    const float *xr = x + m0 * K, *wr = w + n0 * K;
    for (int64_t k = 0; k < K; k += 8) {
        v8 wv[3], xv[4];
        for (int j = 0; j < NR; j++) wv[j] = load8(wr + j * K + k);
        for (int j = 0; j < NR; j++) __builtin_prefetch(wr + (2 * NR + j) * K + k, 0, 1);
        for (int i = 0; i < MR; i++) xv[i] = load8(xr + i * K + k);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] += xv[i] * wv[j];
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(m0 + i) * N + n0 + j] = hsum8(acc[i][j]) + (bias ? bias[n0 + j] : 0.0f);
}

/* Every row of x against weight rows [n, n + NR). */
#define ALL_ROWS(NR)                                                                   \
    do {                                                                               \
        int64_t m = 0;                                                                 \
        for (; m + 4 <= M; m += 4) tile(x, w, bias, y, K, N, m, n, 4, NR);             \
        if (M - m == 3) tile(x, w, bias, y, K, N, m, n, 3, NR);                        \
        else if (M - m == 2) tile(x, w, bias, y, K, N, m, n, 2, NR);                   \
        else if (M - m == 1) tile(x, w, bias, y, K, N, m, n, 1, NR);                   \
    } while (0)

struct linear_args {
    const float *x, *w, *bias;
    float *y;
    int64_t M, K, N;
};

/* Output columns [lo, hi): blocks of 3 weight rows, then single rows. */
static void linear_columns(void *ctx, int64_t lo, int64_t hi) {
    const struct linear_args *a = ctx;
    const float *x = a->x, *w = a->w, *bias = a->bias;
    float *y = a->y;
    const int64_t M = a->M, K = a->K, N = a->N;
    int64_t n = lo;
    for (; n + 3 <= hi; n += 3) ALL_ROWS(3);
    for (; n < hi; n++) ALL_ROWS(1);
}

void f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                int64_t threads) {
    struct linear_args a = {x, w, bias, y, M, K, N};
    parallel_for(N, pool_chunk(N, threads, 3), threads, linear_columns, &a);
}
