/* 8-float vectors for the CPU kernels (GCC vector extensions: AVX2 with -march=native, plain
 * code elsewhere). Loads and stores go through memcpy, so no alignment is assumed. */
#ifndef PAGEDSERVE_SIMD_H
#define PAGEDSERVE_SIMD_H

#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#endif
