/* Weight-only int8 linear for small batches on the CPU (W8A16 with float32 activations):
 * y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]). Decode is bound by reading the weights;
 * int8 weights are a quarter of float32's bytes, and each weight row is read once for all M rows of
 * x (it stays in L1 between them). Built and called by int8_linear_cpu.py; its torch reference
 * dequantizes the weight and runs F.linear.
 *
 * x [M, K] float32; w [N, K] int8; scale [N]; bias [N] or NULL; y [M, N]. The output columns are
 * split over `threads` threads (cpu_pool.h).
 */
#include <stddef.h>
#include <stdint.h>

#include "cpu_pool.h"

struct args {
    const float *x;
    const int8_t *w;
    const float *scale, *bias;
    float *y;
    int64_t M, K, N;
};

static void columns(void *ctx, int64_t lo, int64_t hi) {
    const struct args *a = ctx;
    const int64_t M = a->M, K = a->K, N = a->N;
    for (int64_t n = lo; n < hi; n++) {
        const int8_t *wr = a->w + n * K;
        const float s = a->scale[n], b = a->bias ? a->bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = a->x + m * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += xr[k] * (float)wr[k];
            a->y[m * N + n] = acc * s + b;
        }
    }
}

void int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                 int64_t K, int64_t N, int64_t threads) {
    struct args a = {x, w, scale, bias, y, M, K, N};
    parallel_for(N, pool_chunk(N, threads, 1), threads, columns, &a);
}
