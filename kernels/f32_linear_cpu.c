/* float32 linear on the CPU for decode-sized batches: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * A decode step multiplies tens of rows by every weight, once. BLAS sgemm, tuned for large
 * matrices, loses time at these shapes; here the weights are read from memory once per call, in
 * one of two ways:
 * - Up to PACK_ROWS rows, dot products: each block of 3 weight rows is read once and used for
 *   every row of x, 4 rows at a time. 4 x 3 accumulators, 3 weight vectors and one x vector fill
 *   AVX2's 16 registers exactly; the block after next is prefetched while the first rows use it.
 * - From PACK_ROWS rows on, outer products: 16 weight rows by KC columns are transposed into a
 *   packed panel (16 KB, held in L1), and each 6-row tile of x runs 6 x 16 multiply-adds per
 *   column of the panel, accumulating into y panel by panel. The dot products' x rows outgrow L1
 *   there and every tile re-reads them from L2; measured single-threaded with smol135's weight
 *   shapes, the packed path ran 1.2x the dot products at 32 rows and 1.8x at 128.
 * Built and called by f32_linear_cpu.py; its torch reference is F.linear.
 *
 * x [M, K]; w [N, K]; bias [N] or NULL; y [M, N]; K a multiple of 8. The output columns are split
 * over `threads` threads (cpu_pool.h).
 */
#include <stdint.h>

#include "cpu_pool.h"
#include "simd.h"

#define PACK_ROWS 16 /* from this many rows of x on, the packed path */
#define PANEL 16     /* weight rows in a packed panel: two vectors wide */
#define KC 256       /* columns of K in a packed panel */

/* y[m0 : m0 + MR, n0 : n0 + NR] by dot products; inlined with constant MR <= 4, NR <= 3, so the
 * MR x NR accumulators stay in registers. `prefetch`: fetch the block after next meanwhile (the
 * first tile of a block; the later ones find its weights in L1). */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *bias, float *y,
                                                       int64_t K, int64_t N, int64_t m0, int64_t n0, int MR, int NR,
                                                       int prefetch) {
    v8 acc[4][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = (v8){0};
    const float *xr = x + m0 * K, *wr = w + n0 * K;
    for (int64_t k = 0; k < K; k += 8) {
        v8 wv[3], xv[4];
        for (int j = 0; j < NR; j++) wv[j] = load8(wr + j * K + k);
        if (prefetch)
            for (int j = 0; j < NR; j++) __builtin_prefetch(wr + (2 * NR + j) * K + k, 0, 1);
        for (int i = 0; i < MR; i++) xv[i] = load8(xr + i * K + k);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] += xv[i] * wv[j];
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(m0 + i) * N + n0 + j] = hsum8(acc[i][j]) + (bias ? bias[n0 + j] : 0.0f);
}

/* Every row of x against weight rows [n, n + NR) by dot products. */
#define ALL_ROWS(NR)                                                                         \
    do {                                                                                     \
        int64_t m = 0;                                                                       \
        for (; m + 4 <= M; m += 4) tile(x, w, bias, y, K, N, m, n, 4, NR, m == 0);           \
        if (M - m == 3) tile(x, w, bias, y, K, N, m, n, 3, NR, m == 0);                      \
        else if (M - m == 2) tile(x, w, bias, y, K, N, m, n, 2, NR, m == 0);                 \
        else if (M - m == 1) tile(x, w, bias, y, K, N, m, n, 1, NR, m == 0);                 \
    } while (0)

/* The 8 x 8 block r (8 rows of 8) transposed into c. */
static inline void transpose8(const v8 r[8], v8 c[8]) {
    v8 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[2 * i + 1] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int h = 0; h < 2; h++) /* rows 4h .. 4h + 3: u[4h + j] holds their columns j and j + 4 */
        for (int j = 0; j < 2; j++) {
            u[4 * h + 2 * j] = __builtin_shufflevector(t[4 * h + j], t[4 * h + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[4 * h + 2 * j + 1] = __builtin_shufflevector(t[4 * h + j], t[4 * h + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) {
        c[j] = __builtin_shufflevector(u[j], u[4 + j], 0, 1, 2, 3, 8, 9, 10, 11);
        c[j + 4] = __builtin_shufflevector(u[j], u[4 + j], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* p[kk][j] = w[n0 + j, k0 + kk] for j < PANEL, kk < kc. */
static inline void pack(const float *w, int64_t K, int64_t n0, int64_t k0, int64_t kc, float *p) {
    for (int64_t kk = 0; kk < kc; kk += 8)
        for (int h = 0; h < PANEL; h += 8) {
            v8 r[8], c[8];
            for (int i = 0; i < 8; i++) r[i] = load8(w + (n0 + h + i) * K + k0 + kk);
            transpose8(r, c);
            for (int t = 0; t < 8; t++) store8(p + (kk + t) * PANEL + h, c[t]);
        }
}

/* y[m0 : m0 + MR, n0 : n0 + PANEL] += x[m0 : m0 + MR, k0 : k0 + kc] p; `first` starts from the
 * bias (or zero) instead of y. Inlined with constant MR <= 6: 12 accumulators. */
static inline __attribute__((always_inline)) void panel_tile(const float *x, const float *p, const float *bias,
                                                             float *y, int64_t K, int64_t N, int64_t m0, int64_t n0,
                                                             int64_t k0, int64_t kc, int MR, int first) {
    v8 acc[6][2];
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = !first ? load8(y + (m0 + i) * N + n0 + 8 * h) : bias ? load8(bias + n0 + 8 * h) : (v8){0};
    const float *xr = x + m0 * K + k0;
    for (int64_t kk = 0; kk < kc; kk++) {
        const v8 w0 = load8(p + kk * PANEL), w1 = load8(p + kk * PANEL + 8);
        for (int i = 0; i < MR; i++) {
            const v8 b = (v8){0} + xr[i * K + kk];
            acc[i][0] += b * w0;
            acc[i][1] += b * w1;
        }
    }
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++) store8(y + (m0 + i) * N + n0 + 8 * h, acc[i][h]);
}

/* Every row of x against weight rows [n0, n0 + PANEL), one packed panel of K at a time. */
static void panel_rows(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                       int64_t n0) {
    float p[KC * PANEL] __attribute__((aligned(64)));
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = K - k0 < KC ? K - k0 : KC;
        const int first = k0 == 0;
        pack(w, K, n0, k0, kc, p);
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 6, first);
        switch (M - m) {
            case 5: panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 5, first); break;
            case 4: panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 4, first); break;
            case 3: panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 3, first); break;
            case 2: panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 2, first); break;
            case 1: panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, 1, first); break;
        }
    }
}

struct linear_args {
    const float *x, *w, *bias;
    float *y;
    int64_t M, K, N;
};

/* Output columns [lo, hi): packed panels of 16 weight rows (from PACK_ROWS rows of x on), then
 * blocks of 3, then single rows. */
static void linear_columns(void *ctx, int64_t lo, int64_t hi) {
    const struct linear_args *a = ctx;
    const float *x = a->x, *w = a->w, *bias = a->bias;
    float *y = a->y;
    const int64_t M = a->M, K = a->K, N = a->N;
    int64_t n = lo;
    if (M >= PACK_ROWS)
        for (; n + PANEL <= hi; n += PANEL) panel_rows(x, w, bias, y, M, K, N, n);
    for (; n + 3 <= hi; n += 3) ALL_ROWS(3);
    for (; n < hi; n++) ALL_ROWS(1);
}

void f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                int64_t threads) {
    struct linear_args a = {x, w, bias, y, M, K, N};
    parallel_for(N, pool_chunk(N, threads, M >= PACK_ROWS ? PANEL : 3), threads, linear_columns, &a);
}
