/* bf16 <-> fp32, one value at a time: the rounding every kernel set shares (round to nearest
 * even, as PyTorch's bf16 tensors store). */
#pragma once
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline uint32_t f2bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf2f(bf16 v) { return bits2f((uint32_t)v << 16); }

static inline bf16 f2bf(float f) {
    uint32_t u = f2bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as PyTorch */
    return (bf16)(u >> 16);
}

static inline float rbf(float f) { return bf2f(f2bf(f)); } /* round through bf16 */
