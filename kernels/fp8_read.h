/* fp8 KV cache bytes (e4m3fn, e5m2) read as float32 for the CPU attention kernel
 * (paged_decode_cpu.c); kv_write_cpu.c writes them. */
#ifndef PAGEDSERVE_FP8_READ_H
#define PAGEDSERVE_FP8_READ_H

#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#include "simd.h"

typedef uint32_t u8 __attribute__((vector_size(32)));

/* Cache formats: float32, or fp8 bytes widened on the fly. An fp8 byte's sign, exponent and
 * mantissa bits are moved to float32's positions (sign-extended to 32 bits, shifted left so that
 * the mantissa's top bit lands on float32's, masked to sign | exponent | mantissa); read as a
 * float32 that is the value times 2^(bias difference), so one multiply by a power of two rebiases
 * it, exactly, subnormals included (NaN encodings are not preserved; the cache never holds them). */
enum { F32 = 0, E4M3 = 1, E5M2 = 2 };
#define FP8_SHIFT(FMT) ((FMT) == E4M3 ? 20 : 21)
#define FP8_MASK(FMT) ((FMT) == E4M3 ? 0x87F00000u : 0x8FE00000u)
#define FP8_REBIAS(FMT) ((FMT) == E4M3 ? 0x1p120f : 0x1p112f) /* 2^(127 - 7), 2^(127 - 15) */

/* Elements [offset, offset + 8) of the cache as float32. */
static inline __attribute__((always_inline)) v8 row8(const void *cache, int64_t offset, int FMT) {
    if (FMT == F32) return load8((const float *)cache + offset);
    const int8_t *p = (const int8_t *)cache + offset;
#ifdef __AVX2__
    u8 x = (u8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    u8 x;
    for (int i = 0; i < 8; i++) x[i] = (uint32_t)(int32_t)p[i];
#endif
    return (v8)((x << FP8_SHIFT(FMT)) & FP8_MASK(FMT)) * FP8_REBIAS(FMT);
}

/* Element `offset` of the cache as float32 (the same widening, one at a time). */
static inline float elem(const void *cache, int64_t offset, int fmt) {
    if (fmt == F32) return ((const float *)cache)[offset];
    const uint32_t bits = ((uint32_t)(int32_t)((const int8_t *)cache)[offset] << FP8_SHIFT(fmt)) & FP8_MASK(fmt);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * FP8_REBIAS(fmt);
}

#endif
