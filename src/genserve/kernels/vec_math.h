/* Vector helpers per kernel set: 16-lane AVX-512 (+BF16) or 8-lane AVX2 + FMA, and the `v_*`
 * names over whichever this build has, so the element-wise kernels are written once. bf16 is
 * widened to fp32 by a 16-bit shift; fp32 -> bf16 rounds to nearest even, as PyTorch. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* Cephes' expf on x - n ln2 (n = round(x / ln2), given): the polynomial p ~ exp(x - n ln2),
 * for either vector width V (_mm512, _mm256). Relative error ~1e-7, far below the bf16
 * rounding of any output. */
#define EXP_POLY(V, x, n, p)                                                    \
    do {                                                                        \
        __typeof__(x) r_ = V##_fnmadd_ps(n, V##_set1_ps(0.693359375f), x);      \
        r_ = V##_fnmadd_ps(n, V##_set1_ps(-2.12194440e-4f), r_);                \
        p = V##_set1_ps(1.9875691500e-4f);                                      \
        p = V##_fmadd_ps(p, r_, V##_set1_ps(1.3981999507e-3f));                 \
        p = V##_fmadd_ps(p, r_, V##_set1_ps(8.3334519073e-3f));                 \
        p = V##_fmadd_ps(p, r_, V##_set1_ps(4.1665795894e-2f));                 \
        p = V##_fmadd_ps(p, r_, V##_set1_ps(1.6666665459e-1f));                 \
        p = V##_fmadd_ps(p, r_, V##_set1_ps(5.0000001201e-1f));                 \
        p = V##_fmadd_ps(p, V##_mul_ps(r_, r_), V##_add_ps(r_, V##_set1_ps(1.0f))); \
    } while (0)

#if defined(__AVX512BF16__)
static inline __m512 load_bf16x16(const bf16 *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16x16(__m512 x) { /* through bf16 (RNE) and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* exp on 16 lanes for x <= 0 (softmax after subtracting the max): EXP_POLY scaled by 2^n */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p;
    EXP_POLY(_mm512, x, n, p);
    return _mm512_scalef_ps(p, n);
}

/* bf16(silu(g)) for 16 bf16 values g held in fp32, as PyTorch's bf16 silu:
 * g / (1 + exp(-g)) = g * num / (1 + e), e = exp(-|g|), num = 1 (g >= 0) or e: no overflow,
 * and the reciprocal of 1 + e in [1, 2] from rcp14 and one Newton step (within an ulp of the
 * division, far below bf16's rounding). */
static inline __m512 silu_bf16x16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 den = _mm512_add_ps(e, one);
    __m512 r = _mm512_rcp14_ps(den);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.0f)));
    const __m512 num = _mm512_mask_mov_ps(one, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), e);
    return round_bf16x16(_mm512_mul_ps(_mm512_mul_ps(g, num), r));
}

#define VL 16
typedef __m512 vfloat;
static inline vfloat v_load_bf16(const bf16 *p) { return load_bf16x16(p); }
static inline void v_store_bf16(bf16 *p, vfloat x) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}
static inline vfloat v_round_bf16(vfloat x) { return round_bf16x16(x); }
static inline vfloat v_exp(vfloat x) { return exp512(x); }
static inline vfloat v_silu_bf16(vfloat g) { return silu_bf16x16(g); }
static inline float v_hsum(vfloat x) { return _mm512_reduce_add_ps(x); }
static inline float v_hmax(vfloat x) { return _mm512_reduce_max_ps(x); }
#define VPS(op) _mm512_##op##_ps

#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 load_bf16x8(const bf16 *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* fp32 -> bf16 bits in the low half of each dword: RNE as f2bf, NaN kept (quieted) */
static inline __m256i bf16_bits8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x), hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

static inline __m256 round_bf16x8(__m256 x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16));
}

static inline void store_bf16x8(bf16 *p, __m256 x) {
    const __m256i b = bf16_bits8(x); /* each dword <= 0xffff: the unsigned saturation keeps it */
    _mm_storeu_si128((__m128i *)p,
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* exp on 8 lanes for x <= 0: EXP_POLY times 2^n built in the exponent field (n >= -126) */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 p;
    EXP_POLY(_mm256, x, n, p);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* silu_bf16x16 on 8 lanes; rcp_ps (12 bits) and one Newton step (~23 bits) */
static inline __m256 silu_bf16x8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 e = exp256(_mm256_min_ps(g, _mm256_sub_ps(zero, g)));
    const __m256 den = _mm256_add_ps(e, one);
    __m256 r = _mm256_rcp_ps(den);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, _mm256_set1_ps(2.0f)));
    const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, zero, _CMP_LT_OQ));
    return round_bf16x8(_mm256_mul_ps(_mm256_mul_ps(g, num), r));
}

/* The one order in which 8 lanes are summed: (0+4 + 2+6) + (1+5 + 3+7). */
static inline float hsum8(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

#define VL 8
typedef __m256 vfloat;
static inline vfloat v_load_bf16(const bf16 *p) { return load_bf16x8(p); }
static inline void v_store_bf16(bf16 *p, vfloat x) { store_bf16x8(p, x); }
static inline vfloat v_round_bf16(vfloat x) { return round_bf16x8(x); }
static inline vfloat v_exp(vfloat x) { return exp256(x); }
static inline vfloat v_silu_bf16(vfloat g) { return silu_bf16x8(g); }
static inline float v_hsum(vfloat x) { return hsum8(x); }
static inline float v_hmax(vfloat x) { return hmax8(x); }
#define VPS(op) _mm256_##op##_ps
#else
#error "kernels need AVX512-BF16 or AVX2 + FMA (kernels/__init__.py picks the flags)"
#endif

/* the fp32 vector ops of this width */
#define v_set1 VPS(set1)
#define v_zero VPS(setzero)
#define v_loadu VPS(loadu)
#define v_storeu VPS(storeu)
#define v_add VPS(add)
#define v_sub VPS(sub)
#define v_mul VPS(mul)
#define v_max VPS(max)
#define v_fmadd VPS(fmadd)
#define v_fmsub VPS(fmsub)
