/* The fp8 KV cache write on the CPU: x / scale, clamped to the format's largest finite value,
 * rounded to fp8 (nearest even, as torch converts) and stored at each token's slot, in one call
 * for a layer's keys or values. A decode step writes a few tokens per layer, so the four torch ops
 * of services/worker/quant/kv_fp8.py (divide, clamp, convert, index_copy) cost more in dispatch
 * than in work. Built and called by kv_write_cpu.py; its torch reference is kv_fp8.write_cache's
 * torch path.
 *
 * x [T, row] float32; slots [T]; cache [rows, row] fp8 bytes; fmt 1: e4m3fn, 2: e5m2. Returns how
 * many slots were outside [0, rows) (those tokens are not written).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FP8_E4M3 1 /* fmt codes, as paged_decode_cpu.c's; anything else is e5m2 */

/* float32 -> fp8 bits; |x| at most the format's largest finite value (NaN stays NaN). */
static inline uint8_t to_fp8(float x, int fmt) {
    const int M = fmt == FP8_E4M3 ? 3 : 2, BIAS = fmt == FP8_E4M3 ? 7 : 15;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    const uint8_t sign = (u >> 24) & 0x80;
    u &= 0x7FFFFFFFu;
    if (u > 0x7F800000u) return sign | 0x7F;
    if ((int32_t)(u >> 23) - 127 + BIAS >= 1) { /* a normal number of the format */
        const int drop = 23 - M;                /* round the dropped mantissa bits to nearest even */
        u += (1u << (drop - 1)) - 1 + ((u >> drop) & 1);
        return sign | (uint8_t)((u >> drop) - ((uint32_t)(127 - BIAS) << M));
    }
    /* a subnormal (or zero): a multiple of 2^(1 - BIAS - M), rounded to nearest even by rintf */
    return sign | (uint8_t)rintf(fabsf(x) * (fmt == FP8_E4M3 ? 0x1p9f : 0x1p16f));
}

/* dst[i] = fp8(clamp(src[i] / scale)) for n elements. A true division, as torch's: the build's
 * -freciprocal-math would multiply by 1 / scale. */
__attribute__((optimize("no-reciprocal-math"))) static void quantize_row(const float *src, uint8_t *dst, int64_t n,
                                                                          float scale, int fmt) {
    const float limit = fmt == FP8_E4M3 ? 448.0f : 57344.0f;
    for (int64_t i = 0; i < n; i++) {
        float q = src[i] / scale;
        q = q < -limit ? -limit : q > limit ? limit : q;
        dst[i] = to_fp8(q, fmt);
    }
}

int64_t kv_write_fp8(const float *x, const int64_t *slots, uint8_t *cache, int64_t T, int64_t row, int64_t rows,
                     float scale, int64_t fmt) {
    int64_t bad = 0;
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0 || slots[t] >= rows) bad++;
        else quantize_row(x + t * row, cache + slots[t] * row, row, scale, (int)fmt);
    }
    return bad;
}
