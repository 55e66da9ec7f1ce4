/* Elements read as float32 (and float32 rounded to bfloat16): the KV cache for the CPU attention
 * kernel (paged_decode_cpu.c), float32, fp8 bytes (e4m3fn, e5m2; kv_write_cpu.c writes them) or
 * bfloat16, and bfloat16 weights for the linear kernel (f32_linear_cpu.c). */
#ifndef PAGEDSERVE_WIDEN_H
#define PAGEDSERVE_WIDEN_H

#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#include "simd.h"

typedef uint32_t u8 __attribute__((vector_size(32)));

/* Formats: float32, or fp8 bytes or bfloat16 widened on the fly. A bfloat16 is the top half
 * of a float32: shifted left 16 bits, it is one, exactly. An fp8 byte's sign, exponent and
 * mantissa bits are moved to float32's positions (sign-extended to 32 bits, shifted left so that
 * the mantissa's top bit lands on float32's, masked to sign | exponent | mantissa); read as a
 * float32 that is the value times 2^(bias difference), so one multiply by a power of two rebiases
 * it, exactly, subnormals included (NaN encodings are not preserved; the cache never holds them). */
enum { F32 = 0, E4M3 = 1, E5M2 = 2, BF16 = 3 };
#define ESIZE(FMT) ((FMT) == F32 ? 4 : (FMT) == BF16 ? 2 : 1) /* bytes per element */
#define FP8_SHIFT(FMT) ((FMT) == E4M3 ? 20 : 21)
#define FP8_MASK(FMT) ((FMT) == E4M3 ? 0x87F00000u : 0x8FE00000u)
#define FP8_REBIAS(FMT) ((FMT) == E4M3 ? 0x1p120f : 0x1p112f) /* 2^(127 - 7), 2^(127 - 15) */

/* Elements [offset, offset + 8) of the cache (or weights) as float32. */
static inline __attribute__((always_inline)) v8 row8(const void *cache, int64_t offset, int FMT) {
    if (FMT == F32) return load8((const float *)cache + offset);
    if (FMT == BF16) {
        const uint16_t *h = (const uint16_t *)cache + offset;
#ifdef __AVX2__
        return (v8)((u8)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h)) << 16);
#else
        u8 x;
        for (int i = 0; i < 8; i++) x[i] = (uint32_t)h[i] << 16;
        return (v8)x;
#endif
    }
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
    if (fmt == BF16) {
        const uint32_t bits = (uint32_t)((const uint16_t *)cache)[offset] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    const uint32_t bits = ((uint32_t)(int32_t)((const int8_t *)cache)[offset] << FP8_SHIFT(fmt)) & FP8_MASK(fmt);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * FP8_REBIAS(fmt);
}

/* x rounded to bfloat16, to nearest even, as torch converts (NaN stays NaN). */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(bits >> 16 | 0x40);
    return (uint16_t)((bits + 0x7FFFu + (bits >> 16 & 1)) >> 16);
}

#endif
