/* Sampling over fp32 logits rows: argmax, inverse-CDF pick, top-p and top-k masks, logsumexp.
 * Each row is reduced alone, in an order fixed by the row's length: the results do not depend
 * on the batch. Written once over `lmask` lane masks and `vfloat` vectors (16 lanes on the
 * AVX-512 sets, 8 on avx2-fma). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec_math.h"

#if defined(__AVX512BF16__)
#define LANES 16
typedef __mmask16 lmask;
static inline lmask first_lanes(int64_t n) { return n >= 16 ? (lmask)0xffff : (lmask)((1u << n) - 1); }
static inline __m512 load_or(const float *p, lmask in, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), in, p);
}
#define CMP(a, b, pred) _mm512_cmp_ps_mask(a, b, pred)
static inline void store_where(float *p, lmask m, float v) { _mm512_mask_storeu_ps(p, m, _mm512_set1_ps(v)); }

/* the probabilities of p in lanes m, summed in double */
static inline double block_sum_pd(const float *p, lmask m) {
    const __m512 v = _mm512_maskz_loadu_ps(m, p);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

/* exp(v - m), 0 where v is -inf */
static inline __m512 keep_finite_exp(__m512 v, __m512 m) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                               exp512(_mm512_sub_ps(v, m)));
}
#else
#define LANES 8
typedef unsigned lmask;
static inline lmask first_lanes(int64_t n) { return n >= 8 ? 0xffu : (lmask)((1u << n) - 1); }
static inline __m256 load_or(const float *p, lmask in, float fill) {
    if (in == 0xffu) return _mm256_loadu_ps(p);
    float tmp[8];
    for (int i = 0; i < 8; i++) tmp[i] = in >> i & 1 ? p[i] : fill;
    return _mm256_loadu_ps(tmp);
}
#define CMP(a, b, pred) ((lmask)_mm256_movemask_ps(_mm256_cmp_ps(a, b, pred)))
static inline void store_where(float *p, lmask m, float v) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
    _mm256_maskstore_ps(p, sel, _mm256_set1_ps(v)); /* lanes outside m are not touched */
}

static inline double block_sum_pd(const float *p, lmask m) {
    const __m256 v = load_or(p, m, 0.0f);
    __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

static inline __m256 keep_finite_exp(__m256 v, __m256 m) {
    return _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ), exp256(_mm256_sub_ps(v, m)));
}

/* torch.argmax of one row: 8 lanes each keep their first maximum, ties go to the lowest index */
static int64_t argmax_row_avx2(const float *row, int64_t n) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    __m256i bidx = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 v = load_or(row + j, first_lanes(n - j), -INFINITY);
        const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, v, gt);
        bidx = _mm256_blendv_epi8(bidx, idx, _mm256_castps_si256(gt));
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
    }
    float b[8];
    int32_t at[8];
    _mm256_storeu_ps(b, best);
    _mm256_storeu_si256((__m256i *)at, bidx);
    int64_t pick = -1;
    const float m = hmax8(best);
    for (int i = 0; i < 8; i++)
        if (b[i] == m && (pick < 0 || at[i] < pick)) pick = at[i];
    return pick < 0 ? 0 : pick;
}
#endif

/* ------------------------------------------------------------------------------- greedy */

/* out[r] = index of the first maximum of x[r, 0:n], as torch.argmax (NaN is never chosen
 * here; a row of -inf gives 0). 16 lanes each keep their first maximum; ties between lanes
 * go to the lowest index. */
void genserve_argmax_f32(const float *x, int rows, int64_t n, int64_t *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
#if defined(__AVX512BF16__)
        const float *row = x + (int64_t)r * n;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i bidx = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                         9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 in = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + j);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, gt, v);
            bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        const float m = _mm512_reduce_max_ps(best);
        const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
        out[r] = at ? _mm512_mask_reduce_min_epi32(at, bidx) : 0;
#else
        out[r] = argmax_row_avx2(x + (int64_t)r * n, n);
#endif
    }
}

/* out[r] = the token that u[r] (uniform in [0, 1)) picks from row r of probs [rows, n] (row
 * stride ld) by inverse CDF: the first j whose running sum of probabilities passes
 * u[r] * (the row's sum). A token of probability 0 is never picked; where rounding leaves the
 * target past every running sum, the last token of nonzero probability is; a row that sums to
 * zero or not to a finite number gives 0. Sums in double over LANES-token blocks in a fixed
 * order: the pick depends only on the row and u[r], not on the batch. */
void genserve_sample_cdf_f32(const float *probs, int64_t ld, int rows, int64_t n, const double *u,
                             int64_t *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *p = probs + (int64_t)r * ld;
        double total = 0.0;
        for (int64_t j = 0; j < n; j += LANES)
            total += block_sum_pd(p + j, first_lanes(n - j));
        int64_t pick = 0;
        if (total > 0.0 && total < INFINITY) {
            const double target = u[r] * total;
            double run = 0.0;
            int64_t last = -1;
            for (int64_t j0 = 0; j0 < n; j0 += LANES) {
                const int64_t j1 = n - j0 >= LANES ? j0 + LANES : n;
                const double block = block_sum_pd(p + j0, first_lanes(j1 - j0));
                if (block > 0.0) {
                    if (run + block > target) { /* in this block, unless rounding says no */
                        double in = run;
                        for (int64_t j = j0; j < j1; j++) {
                            if (p[j] > 0.0f) last = j;
                            in += p[j];
                            if (p[j] > 0.0f && in > target) {
                                pick = j;
                                goto found;
                            }
                        }
                    }
                    for (int64_t j = j1 - 1; j >= j0; j--)
                        if (p[j] > 0.0f) {
                            last = j;
                            break;
                        }
                }
                run += block;
            }
            pick = last < 0 ? 0 : last;
        found:;
        }
        out[r] = pick;
    }
}

/* malloc, or NULL with *failed set (from any thread of a parallel loop) */
static void *malloc_or_flag(size_t bytes, int *failed) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

typedef struct {
    float value;
    int64_t index;
} Ranked;

static int by_value_desc(const void *a, const void *b) {
    const Ranked *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Nucleus filter: in row r of scores [rows, n] (row stride lds; probs [rows, n] its softmax,
 * contiguous), every token whose more likely tokens already hold top_p[r] of the probability
 * becomes -inf (transformers' TopPLogitsWarper: ascending cumulative probability <= 1 - top_p;
 * the most likely token always stays; ties rank by index; NaN goes). top_p[r] >= 1: the row is
 * left alone. No sort of the row: for nonnegative floats the bit patterns order as the values,
 * so the probabilities are bucketed by their top 12 bits, the buckets summed from the top (in
 * double) until top_p is reached, the bucket where it is reached bucketed again by its next 12
 * bits, and only the sub-bucket holding the cut is sorted. Tokens under (1 - top_p) / n always
 * go (all of them together hold less than 1 - top_p) and are skipped by vector compares. */
#define TOP12(bits) ((int)((bits) >> 20))
#define NEXT12(bits) ((int)(((bits) >> 8) & 0xfff))


/* the indices j of p[0:n] with lo <= p[j] < hi (floats), LANES compared at a time */
#define FOR_IN_RANGE(p, n, lo, hi, j, body)                                                      \
    for (int64_t j0_ = 0; j0_ < (n); j0_ += LANES) {                                              \
        const lmask in_ = first_lanes((n) - j0_);                                                 \
        const vfloat v_ = load_or((p) + j0_, in_, 0.0f);                                          \
        lmask hit_ = in_ & CMP(v_, v_set1(lo), _CMP_GE_OQ) & CMP(v_, v_set1(hi), _CMP_LT_OQ);     \
        while (hit_) {                                                                            \
            const int64_t j = j0_ + __builtin_ctz(hit_);                                          \
            hit_ &= hit_ - 1;                                                                     \
            body                                                                                  \
        }                                                                                         \
    }

int genserve_top_p_mask_f32(float *scores, int64_t lds, const float *probs, int rows, int64_t n,
                            const float *top_p) {
    int failed = 0;
#pragma omp parallel for if (rows > 1) schedule(dynamic)
    for (int r = 0; r < rows; r++) {
        const float tp = top_p[r];
        if (!(tp < 1.0f)) continue;
        const float *p = probs + (int64_t)r * n;
        float *s = scores + (int64_t)r * lds;
        double mass[4096];
        int64_t count[4096];
        /* level 1: every token that may stay, by its top 12 bits */
        memset(mass, 0, sizeof mass);
        memset(count, 0, sizeof count);
        const float floor_p = (float)((1.0 - tp) / (double)n * 0.5);
        FOR_IN_RANGE(p, n, floor_p, INFINITY, j, {
            mass[TOP12(f2bits(p[j]))] += p[j];
            count[TOP12(f2bits(p[j]))]++;
        })
        double above = 0.0;
        int b = 4095;
        for (; b >= 0; b--) {
            if (count[b] && above + mass[b] >= tp) break;
            above += mass[b];
        }
        if (b < 0) continue; /* rounding kept the total under top_p: every token stays */
        float v_cut; /* every token under v_cut goes, and those equal from idx_cut on */
        int64_t idx_cut = n;
        /* level 2: the tokens of bucket b, by their next 12 bits */
        const float lo = bits2f((uint32_t)b << 20), hi = bits2f((uint32_t)(b + 1) << 20);
        memset(mass, 0, sizeof mass);
        memset(count, 0, sizeof count);
        FOR_IN_RANGE(p, n, lo, hi, j, {
            mass[NEXT12(f2bits(p[j]))] += p[j];
            count[NEXT12(f2bits(p[j]))]++;
        })
        int b2 = 4095;
        for (; b2 >= 0; b2--) {
            if (count[b2] && above + mass[b2] >= tp) break;
            above += mass[b2];
        }
        if (b2 < 0) { /* rounding: the whole bucket stays */
            v_cut = lo;
        } else {
            const uint32_t base = ((uint32_t)b << 20) | ((uint32_t)b2 << 8);
            const float lo2 = bits2f(base), hi2 = bits2f(base + 256);
            Ranked *sub = malloc_or_flag((size_t)count[b2] * sizeof(Ranked), &failed);
            if (!sub) continue;
            int64_t m = 0;
            FOR_IN_RANGE(p, n, lo2, hi2, j, { sub[m].value = p[j]; sub[m++].index = j; })
            qsort(sub, (size_t)m, sizeof(Ranked), by_value_desc);
            int64_t cut = 0; /* the first of these that goes: the mass above reached top_p */
            for (; cut < m; cut++) {
                if (above >= tp && !(cut == 0 && above == 0.0)) break;
                above += sub[cut].value;
            }
            v_cut = cut < m ? sub[cut].value : lo2;
            idx_cut = cut < m ? sub[cut].index : n;
            free(sub);
        }
        for (int64_t j0 = 0; j0 < n; j0 += LANES) {
            const lmask in = first_lanes(n - j0);
            const vfloat v = load_or(p + j0, in, 0.0f);
            const lmask under = CMP(v, v_set1(v_cut), _CMP_NGE_UQ); /* < v_cut, or NaN */
            lmask tied = CMP(v, v_set1(v_cut), _CMP_EQ_OQ);
            for (lmask b = tied; b; b &= b - 1) /* ties go from idx_cut on */
                if (j0 + __builtin_ctz(b) < idx_cut) tied &= ~(lmask)(1u << __builtin_ctz(b));
            store_where(s + j0, in & (under | tied), -INFINITY);
        }
    }
    return failed ? -1 : 0;
}

/* float -> uint32 in the same order (for every non-NaN float) */
static inline uint32_t order_key(float f) {
    const uint32_t u = f2bits(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

static int float_desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y;
}

/* Top-k filter: in row r of scores [rows, n] (row stride lds), every logit under the row's
 * k[r]-th largest becomes -inf (ties with the k-th stay; k[r] = 0 or >= n: the row is left
 * alone; NaN stays, as in `scores < kth`), as transformers' TopKLogitsWarper. No sort of the row: as the top-p
 * filter, two levels of 12-bit buckets of the logits' order keys, counted from the top until
 * k is reached, then a sort of the sub-bucket holding the k-th value. */
int genserve_top_k_mask_f32(float *scores, int64_t lds, int rows, int64_t n, const int64_t *k) {
    int failed = 0;
#pragma omp parallel for if (rows > 1) schedule(dynamic)
    for (int r = 0; r < rows; r++) {
        if (k[r] <= 0 || k[r] >= n) continue;
        float *s = scores + (int64_t)r * lds;
        int64_t count[4096];
        memset(count, 0, sizeof count);
        for (int64_t j = 0; j < n; j++)
            if (s[j] == s[j]) count[order_key(s[j]) >> 20]++;
        int64_t above = 0;
        int b = 4095;
        for (; b >= 0 && above + count[b] < k[r]; b--) above += count[b];
        if (b < 0) continue; /* fewer than k non-NaN logits: keep them all */
        int64_t sub_count[4096];
        memset(sub_count, 0, sizeof sub_count);
        for (int64_t j = 0; j < n; j++)
            if ((int)(order_key(s[j]) >> 20) == b && s[j] == s[j]) sub_count[(order_key(s[j]) >> 8) & 0xfff]++;
        int b2 = 4095;
        for (; b2 >= 0 && above + sub_count[b2] < k[r]; b2--) above += sub_count[b2];
        const uint32_t base = ((uint32_t)b << 20) | ((uint32_t)b2 << 8);
        float *sub = malloc_or_flag((size_t)sub_count[b2] * sizeof(float), &failed);
        if (!sub) continue;
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (s[j] == s[j] && (order_key(s[j]) & ~0xffu) == base) sub[m++] = s[j];
        qsort(sub, (size_t)m, sizeof(float), float_desc);
        const float kth = sub[k[r] - above - 1];
        free(sub);
        for (int64_t j0 = 0; j0 < n; j0 += LANES) {
            const lmask in = first_lanes(n - j0);
            store_where(s + j0, in & CMP(load_or(s + j0, in, 0.0f), v_set1(kth), _CMP_LT_OQ), -INFINITY);
        }
    }
    return failed ? -1 : 0;
}

/* out[r] = log(sum_j exp(x[r, j])) for row r of x [rows, n] (row stride ld), as torch.logsumexp:
 * the row's maximum, then exp(x - max) summed in VL fp32 lanes per 4,096 values and those in
 * double. A row of -inf gives -inf; a row holding +inf gives +inf. */
void genserve_logsumexp_f32(const float *x, int64_t ld, int rows, int64_t n, float *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *row = x + (int64_t)r * ld;
        vfloat mx = v_set1(-INFINITY);
        for (int64_t j = 0; j < n; j += LANES) mx = v_max(mx, load_or(row + j, first_lanes(n - j), -INFINITY));
        const float m = v_hmax(mx);
        if (!(m > -INFINITY && m < INFINITY)) {
            out[r] = m;
            continue;
        }
        double total = 0.0;
        for (int64_t j0 = 0; j0 < n; j0 += 4096) {
            vfloat sum = v_zero();
            for (int64_t j = j0; j < n && j < j0 + 4096; j += LANES) {
                const vfloat v = load_or(row + j, first_lanes(n - j), -INFINITY);
                sum = v_add(sum, keep_finite_exp(v, v_set1(m)));
            }
            total += v_hsum(sum);
        }
        out[r] = (float)((double)m + log(total));
    }
}
