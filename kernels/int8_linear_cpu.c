/* Weight-only int8 linear for small batches on the CPU (W8A16 with float32 activations):
 * y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]). Decode is bound by reading the weights;
 * int8 weights are a quarter of float32's bytes, and each weight row is read once for all M rows of
 * x (it stays in L1 between them). Built and called by int8_linear_cpu.py; its torch reference
 * dequantizes the weight and runs F.linear.
 *
 * x [M, K] float32; w [N, K] int8; scale [N]; bias [N] or NULL; y [M, N]. The output columns are
 * split over `threads` OpenMP threads.
 */
#include <stdint.h>
#include <stddef.h>

void int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                 int64_t K, int64_t N, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        const float s = scale[n], b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += xr[k] * (float)wr[k];
            y[m * N + n] = acc * s + b;
        }
    }
}
