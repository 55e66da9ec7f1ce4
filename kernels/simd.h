/* 8-float vectors for the CPU kernels (GCC vector extensions: AVX2 with -march=native, plain
 * code elsewhere). Loads and stores go through memcpy, so no alignment is assumed. */
#ifndef PAGEDSERVE_SIMD_H
#define PAGEDSERVE_SIMD_H

#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

typedef int32_t vi8 __attribute__((vector_size(32)));

/* x with each lane clamped to [lo, hi] (GCC's C has no vector ?:, so through lane masks). */
static inline v8 clamp8(v8 x, float lo, float hi) {
    const vi8 above = (vi8)(x > hi), below = (vi8)(x < lo), keep = ~(above | below);
    return (v8)(((vi8)x & keep) | ((vi8)((v8){0} + hi) & above) | ((vi8)((v8){0} + lo) & below));
}

/* e^x, lane by lane, within 5e-7 of it relatively for |x| <= 87 (x is clamped there, where
 * float32's e^x neither overflows nor goes subnormal): x = n ln 2 + r with n = round(x / ln 2),
 * |r| <= ln 2 / 2, so e^x = 2^n e^r, e^r by its Taylor series to r^6 / 720 (error below 2e-7).
 * Vectorized where a loop of expf is not (libm's vector variants need -ffast-math). */
static inline v8 exp8(v8 x) {
    x = clamp8(x, -87.0f, 87.0f);
    const v8 s = x * 1.44269504f + 0.5f; /* n = floor(x / ln 2 + 1/2) */
    vi8 n = __builtin_convertvector(s, vi8);
    n += (vi8)(__builtin_convertvector(n, v8) > s); /* truncation rounded up a negative s: -1 */
    const v8 nf = __builtin_convertvector(n, v8);
    const v8 r = (x - nf * 0.693145752f) - nf * 1.42860677e-6f; /* ln 2 in two parts: n * hi is exact */
    v8 p = r * (1.0f / 720) + (1.0f / 120);
    p = p * r + (1.0f / 24);
    p = p * r + (1.0f / 6);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v8 scale;
    const vi8 bits = (n + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
