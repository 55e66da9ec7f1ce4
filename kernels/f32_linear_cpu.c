/* float32 linear on the CPU for decode-sized batches: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * A decode step multiplies tens of rows by every weight, once. BLAS sgemm, tuned for large
 * matrices, loses time at these shapes; here the weights are read from memory once per call, in
 * one of two ways:
 * - Below PACK_ROWS rows, dot products: each block of 3 weight rows is read once and used for
 *   every row of x, 4 rows at a time. 4 x 3 accumulators, 3 weight vectors and one x vector fill
 *   AVX2's 16 registers exactly; the block after next is prefetched while the first rows use it.
 * - From PACK_ROWS rows on, outer products: 16 weight rows by KC columns are transposed into a
 *   packed panel (16 KB, held in L1), and each 6-row tile of x runs 6 x 16 multiply-adds per
 *   column of the panel, accumulating into y panel by panel. With AVX512 float32 tiles take 8 rows
 *   of one 16-float vector each (panel_tile): smol135's weight shapes from memory, both threads,
 *   2-core AMD EPYC, two alternating rounds, 8 rows of two 8-float halves against 6-row tiles: 1.07x
 *   and 1.07x at 40 rows, 1.03x and 1.04x at 64, about 1.01x at 48 and 96 (benchmarks/linear_cpu.py);
 *   one 16-float vector per row gained 1-4% more. The dot products' x rows outgrow L1
 *   there and every tile re-reads them from L2. Where they cross over depends on the registers:
 *   over smol135's weight shapes from memory on a 2-core AMD EPYC (benchmarks/linear_cpu.py's
 *   shapes, both threads), built for AVX512 the dot products ran 1.30x the panels at 16 rows,
 *   1.06x at 32 and 1.02x at 36, the panels 1.10x them at 40 and 1.06x at 64; built for AVX2 on
 *   the same CPU, the dot products 1.20x at 16 and 1.03x at 24, the panels 1.06x at 32. bfloat16
 *   weights with AVX512-BF16 take the panels from BF16_PACK_ROWS (1.4x the dot products at 16).
 * Built and called by f32_linear_cpu.py; its torch reference is F.linear.
 *
 * x [M, K] float32; w [N, K] float32 (f32_linear) or bfloat16 (bf16_linear: half the bytes to
 * stream, widened to float32 as it is read; on the packed path with AVX512-BF16 and K a multiple
 * of 16, x is rounded to bfloat16 for the CPU's bfloat16 dot products instead, bf16_panels.h; the
 * sums are float32 either way); bias [N] or NULL; y [M, N]; K a multiple of 8. The output columns
 * are split over `threads` threads (cpu_pool.h).
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "simd.h"
#include "widen.h"
#include "bf16_panels.h"

#if defined(__AVX512F__) /* from this many rows of x on, the packed path (see above) */
#define PACK_ROWS 36
#else
#define PACK_ROWS 24
#endif
#define BF16_PACK_ROWS 16 /* the same, for bfloat16 weights on AVX512-BF16 panels */
#if defined(__AVX512F__) /* rows of a float32 panel tile: 8 x 1 16-float accumulators (32 registers), 6 x 2 8-float (16) */
#define F32_TILE_ROWS 8
#else
#define F32_TILE_ROWS 6
#endif
#define PANEL 16     /* weight rows in a packed panel: two vectors wide */
#define KC 256       /* columns of K in a packed panel */

/* y[m0 : m0 + MR, n0 : n0 + NR] by dot products; inlined with constant MR <= 4, NR <= 3, so the
 * MR x NR accumulators stay in registers. `prefetch`: fetch the block after next meanwhile (the
 * first tile of a block; the later ones find its weights in L1). wf: the weights' format, F32 or
 * BF16 (widen.h). */
static inline __attribute__((always_inline)) void tile(const float *x, const void *w, const float *bias, float *y,
                                                       int64_t K, int64_t N, int64_t m0, int64_t n0, int MR, int NR,
                                                       int prefetch, const int wf) {
    v8 acc[4][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = (v8){0};
    const float *xr = x + m0 * K;
    const char *wb = (const char *)w;
    for (int64_t k = 0; k < K; k += 8) {
        v8 wv[3], xv[4];
        for (int j = 0; j < NR; j++) wv[j] = row8(w, (n0 + j) * K + k, wf);
        if (prefetch)
            for (int j = 0; j < NR; j++) __builtin_prefetch(wb + ((n0 + 2 * NR + j) * K + k) * ESIZE(wf), 0, 1);
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
        for (; m + 4 <= M; m += 4) tile(x, w, bias, y, K, N, m, n, 4, NR, m == 0, wf);       \
        if (M - m == 3) tile(x, w, bias, y, K, N, m, n, 3, NR, m == 0, wf);                  \
        else if (M - m == 2) tile(x, w, bias, y, K, N, m, n, 2, NR, m == 0, wf);             \
        else if (M - m == 1) tile(x, w, bias, y, K, N, m, n, 1, NR, m == 0, wf);             \
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
static inline __attribute__((always_inline)) void pack(const void *w, int64_t K, int64_t n0, int64_t k0, int64_t kc,
                                                       float *p, const int wf) {
    for (int64_t kk = 0; kk < kc; kk += 8)
        for (int h = 0; h < PANEL; h += 8) {
            v8 r[8], c[8];
            for (int i = 0; i < 8; i++) r[i] = row8(w, (n0 + h + i) * K + k0 + kk, wf);
            if (kk * ESIZE(wf) % 64 == 0) /* the next panel's rows, one line each (it may not exist: harmless) */
                for (int i = 0; i < 8; i++)
                    __builtin_prefetch((const char *)w + ((n0 + PANEL + h + i) * K + k0 + kk) * ESIZE(wf), 0, 1);
            transpose8(r, c);
            for (int t = 0; t < 8; t++) store8(p + (kk + t) * PANEL + h, c[t]);
        }
}

/* y[m0 : m0 + MR, n0 : n0 + PANEL] += x[m0 : m0 + MR, k0 : k0 + kc] p; `first` starts from the
 * bias (or zero) instead of y. Inlined with constant MR <= F32_TILE_ROWS. With AVX512 a panel row is
 * one 16-float vector: 8 rows take 8 accumulators and 17 instructions per column of the panel,
 * against 26 for two 8-float halves (on AVX512 CPUs with two 512-bit FMA units, twice the
 * multiply-adds per instruction). smol135's weight shapes from memory, both threads, 2-core AMD
 * EPYC (whose 512-bit FMAs take two cycles), three alternating rounds against 8 x 2 halves: 1.05x at
 * 36 rows, 1.01-1.02x at 40, 1.01x at 64 to 128; 16 rows of one vector ran 0.94x at 40 (their x
 * rows and the panel outgrow L1). */
static inline __attribute__((always_inline)) void panel_tile(const float *x, const float *p, const float *bias,
                                                             float *y, int64_t K, int64_t N, int64_t m0, int64_t n0,
                                                             int64_t k0, int64_t kc, int MR, int first) {
    const float *xr = x + m0 * K + k0;
#if defined(__AVX512F__)
    __m512 acc[F32_TILE_ROWS];
    for (int i = 0; i < MR; i++)
        acc[i] = !first ? _mm512_loadu_ps(y + (m0 + i) * N + n0) : bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int64_t kk = 0; kk < kc; kk++) {
        const __m512 w = _mm512_loadu_ps(p + kk * PANEL);
        for (int i = 0; i < MR; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xr[i * K + kk]), w, acc[i]);
    }
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
#else
    v8 acc[F32_TILE_ROWS][2];
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = !first ? load8(y + (m0 + i) * N + n0 + 8 * h) : bias ? load8(bias + n0 + 8 * h) : (v8){0};
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
#endif
}

/* y[m0 : m0 + MR, n0 : n0 + PANEL] += rows of x times the panel p over its kc columns: float32
 * multiply-adds, or with xb (x as bfloat16 pairs) AVX512-BF16 dot products over a panel of weight
 * pairs (bf16_panels.h), k0 and kc then counting pairs. */
static inline __attribute__((always_inline)) void any_tile(const float *x, const uint32_t *xb, const float *p,
                                                           const float *bias, float *y, int64_t K, int64_t N,
                                                           int64_t m0, int64_t n0, int64_t k0, int64_t kc, int MR,
                                                           int first) {
#if BF16_PANELS
    if (xb) {
        bf16_panel_tile(xb, (const uint32_t *)p, bias, y, K / 2, N, m0, n0, k0, kc, MR, first);
        return;
    }
#endif
    panel_tile(x, p, bias, y, K, N, m0, n0, k0, kc, MR, first);
}

/* Every row of x against weight rows [n0, n0 + PANEL), one packed panel of KC columns (or, with
 * xb, KC pairs of bfloat16 weights, a pair packed as one 32-bit element) at a time. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, const uint32_t *xb, const void *w,
                                                             const float *bias, float *y, int64_t M, int64_t K,
                                                             int64_t N, int64_t n0, const int wf) {
    float p[KC * PANEL] __attribute__((aligned(64)));
    const int64_t depth = xb ? K / 2 : K;
    for (int64_t k0 = 0; k0 < depth; k0 += KC) {
        const int64_t kc = depth - k0 < KC ? depth - k0 : KC;
        const int first = k0 == 0;
        pack(w, depth, n0, k0, kc, p, xb ? F32 : wf);
        int64_t m = 0;
        if (!xb)
            for (; m + F32_TILE_ROWS <= M; m += F32_TILE_ROWS)
                panel_tile(x, p, bias, y, K, N, m, n0, k0, kc, F32_TILE_ROWS, first);
        for (; m + 6 <= M; m += 6) any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 6, first);
        switch (M - m) {
            case 5: any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 5, first); break;
            case 4: any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 4, first); break;
            case 3: any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 3, first); break;
            case 2: any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 2, first); break;
            case 1: any_tile(x, xb, p, bias, y, K, N, m, n0, k0, kc, 1, first); break;
        }
    }
}

struct linear_args {
    const float *x, *bias;
    const void *w;
    float *y;
    int64_t M, K, N;
    const uint32_t *xb; /* x as bfloat16 pairs where bfloat16 weights take the AVX512-BF16 panels, else NULL */
    int panels;         /* packed panels (else dot products) */
};

/* Output columns [lo, hi): packed panels of 16 weight rows (a->panels), then blocks of 3, then
 * single rows. */
static inline __attribute__((always_inline)) void columns(const struct linear_args *a, int64_t lo, int64_t hi,
                                                          const int wf) {
    const float *x = a->x, *bias = a->bias;
    const void *w = a->w;
    float *y = a->y;
    const int64_t M = a->M, K = a->K, N = a->N;
    int64_t n = lo;
    if (a->panels)
        for (; n + PANEL <= hi; n += PANEL) panel_rows(x, a->xb, w, bias, y, M, K, N, n, wf);
    for (; n + 3 <= hi; n += 3) ALL_ROWS(3);
    for (; n < hi; n++) ALL_ROWS(1);
}
static void columns_f32(void *ctx, int64_t lo, int64_t hi) { columns(ctx, lo, hi, F32); }
static void columns_bf16(void *ctx, int64_t lo, int64_t hi) { columns(ctx, lo, hi, BF16); }

/* y = x w^T (+ bias) for weights of format wf (F32 or BF16). */
static void linear_any(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                       int64_t threads, int wf) {
    const int bf16_dots = BF16_PANELS && wf == BF16 && K % 16 == 0; /* pack's 8 x 8 blocks of pairs */
    struct linear_args a = {x, bias, w, y, M, K, N, NULL, M >= (bf16_dots ? BF16_PACK_ROWS : PACK_ROWS)};
    uint32_t *xb = NULL;
    if (bf16_dots && a.panels) {
        xb = malloc((size_t)(M * K / 2) * sizeof(uint32_t));
        if (!xb) abort();
#if BF16_PANELS
        bf16_pairs(x, xb, M * K);
#endif
        a.xb = xb;
    }
    parallel_for(N, pool_chunk(N, threads, a.panels ? PANEL : 3), threads, wf == BF16 ? columns_bf16 : columns_f32,
                 &a);
    free(xb);
}

void f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                int64_t threads) {
    linear_any(x, w, bias, y, M, K, N, threads, F32);
}

void bf16_linear(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                 int64_t threads) {
    linear_any(x, w, bias, y, M, K, N, threads, BF16);
}
