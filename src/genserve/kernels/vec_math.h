/* 16-lane bf16/fp32 helpers shared by the kernels (AVX512F + AVX512-BF16). */
#pragma once
#include <immintrin.h>
#include <stdint.h>

typedef uint16_t bf16;

static inline __m512 load_bf16x16(const bf16 *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16x16(__m512 x) { /* through bf16 (RNE) and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* exp on 16 lanes for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial on
 * x - n ln2, scaled by 2^n; relative error ~1e-7, far below the bf16 rounding of the output. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
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
