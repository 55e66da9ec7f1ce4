/* bfloat16 weights times rows of x on CPUs with AVX512-BF16, for f32_linear_cpu.c's packed path.
 *
 * vdpbf16ps multiplies 16 pairs of bfloat16s and adds each pair's two products into one float32
 * lane: 32 multiply-adds per instruction, twice what float32 FMAs do in the same time. So, from
 * BF16_PACK_ROWS rows on, x is rounded to bfloat16 (to nearest even, as torch's bfloat16 layers have
 * it already) and multiplied against packed panels of weight pairs; the sums stay float32.
 * A panel holds 16 weight rows by KC pairs of K: p[kk][j] = (w[n0 + j, 2 kk], w[n0 + j, 2 kk + 1]),
 * one 32-bit pair per lane, built by f32_linear_cpu.c's pack over 32-bit elements (panel_rows).
 * Without AVX512-BF16 (BF16_PANELS 0) the packed path widens the weights to float32 instead.
 */
#ifndef PAGEDSERVE_BF16_PANELS_H
#define PAGEDSERVE_BF16_PANELS_H

#include <stdint.h>

#include "widen.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BF16_PANELS 1

/* xb[i] = the pair (x[2i], x[2i + 1]) rounded to bfloat16, for n floats (n even). */
static void bf16_pairs(const float *x, uint32_t *xb, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(xb + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
    for (; i < n; i += 2) xb[i / 2] = (uint32_t)to_bf16(x[i]) | (uint32_t)to_bf16(x[i + 1]) << 16;
}

/* y[m0 : m0 + MR, n0 : n0 + 16] += xb rows [m0, m0 + MR), pairs [kp0, kp0 + kpc) times the panel p;
 * `first` starts from the bias (or zero) instead of y. Inlined with constant MR <= 6. K2 = K / 2. */
static inline __attribute__((always_inline)) void bf16_panel_tile(const uint32_t *xb, const uint32_t *p,
                                                                  const float *bias, float *y, int64_t K2, int64_t N,
                                                                  int64_t m0, int64_t n0, int64_t kp0, int64_t kpc,
                                                                  int MR, int first) {
    __m512 acc[6];
    for (int i = 0; i < MR; i++)
        acc[i] = !first ? _mm512_loadu_ps(y + (m0 + i) * N + n0) : bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    const uint32_t *xr = xb + m0 * K2 + kp0;
    for (int64_t kk = 0; kk < kpc; kk++) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(p + kk * 16);
        for (int i = 0; i < MR; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)xr[i * K2 + kk]), w);
    }
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}

#else
#define BF16_PANELS 0
#endif

#endif
