/* panel_linear.c's register-blocked micro-kernels, one per vector ISA: c[R][NP][16] = R rows
 * of X times NP panels (P's layout: panel_linear.c), each element one fp32 chain over k in
 * order from zero (AVX2: one FMA per k; AVX-512-BF16: one vdpbf16ps per pair of k). Included
 * by panel_linear.c only. */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

#define PW 16 /* columns per panel */

/* The first row block of a register block prefetches the next one's panels, a line per line
 * it reads, so the weight streams at memory bandwidth rather than latency (M = 1 above all) */
#define PF_HINT _MM_HINT_T0
#define RMAX 6  /* rows per register block */
#define NPMAX 8 /* panels per register block (M = 1 streams this many at once) */

#if defined(__AVX512BF16__)
/* X rows are read in place as bf16 pairs */
typedef bf16 xelem;
#define X_CONVERTED 0

/* one pair of k (kk) of R rows against NP panels: x pairs in place, or (last of an odd K)
 * x[K - 1] with 0 beside it, x[K] never read */
static inline __attribute__((always_inline)) void dp_pair(__m512 acc[][NPMAX], const bf16 *x,
                                                          int64_t ldx, const bf16 *const *p,
                                                          int kk, int last, const int R,
                                                          const int NP, int64_t pf) {
    __m512bh w[NPMAX];
    for (int q = 0; q < NP; q++) w[q] = (__m512bh)_mm512_loadu_si512(p[q] + (int64_t)kk * 2 * PW);
    if (pf)
        for (int q = 0; q < NP; q++) _mm_prefetch((const char *)(p[q] + pf + (int64_t)kk * 2 * PW), PF_HINT);
    for (int r = 0; r < R; r++) {
        const bf16 *xr = x + r * ldx + 2 * kk;
        /* the pair broadcast straight from memory (a load-port op), not through a register
         * (a shuffle on a port vdpbf16ps needs) */
        const __m512bh xb = (__m512bh)(last ? _mm512_set1_epi32(xr[0])
                                            : _mm512_broadcastd_epi32(_mm_loadu_si32(xr)));
        for (int q = 0; q < NP; q++) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], xb, w[q]);
    }
}

/* c[R][NP * 16] = R rows of X (x, row stride ldx) times the panels p[0..NP) */
static inline __attribute__((always_inline)) void micro(const bf16 *x, int64_t ldx,
                                                        const bf16 *const *p, int K, float *c,
                                                        const int R, const int NP, int64_t pf) {
    __m512 acc[RMAX][NPMAX];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++) acc[r][q] = _mm512_setzero_ps();
    for (int kk = 0; kk < K / 2; kk++) dp_pair(acc, x, ldx, p, kk, 0, R, NP, pf);
    if (K & 1) dp_pair(acc, x, ldx, p, K / 2, 1, R, NP, pf);
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++) _mm512_storeu_ps(c + (r * NP + q) * PW, acc[r][q]);
}

#else
/* X is converted to fp32 once per call (per block of rows), so a broadcast is one load */
typedef float xelem;
#define X_CONVERTED 1

static inline __attribute__((always_inline)) void micro(const float *x, int64_t ldx,
                                                        const bf16 *const *p, int K, float *c,
                                                        const int R, const int NP, int64_t pf) {
    __m256 acc[RMAX][NPMAX][2];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++) acc[r][q][0] = acc[r][q][1] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    const int kp = (K + 1) / 2;
    for (int kk = 0; kk < kp; kk++) {
        const int odd_k = 2 * kk + 1 < K; /* an odd K's last pair has no odd k */
        if (pf)
            for (int q = 0; q < NP; q++) _mm_prefetch((const char *)(p[q] + pf + (int64_t)kk * 2 * PW), PF_HINT);
        for (int q = 0; q < NP; q++) {
            /* each line loaded once: its even k (shift), then its odd k (mask) */
            const bf16 *line = p[q] + (int64_t)kk * 2 * PW;
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)line);
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(line + 16));
            const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
            const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_broadcast_ss(x + r * ldx + 2 * kk);
                acc[r][q][0] = _mm256_fmadd_ps(xb, e0, acc[r][q][0]);
                acc[r][q][1] = _mm256_fmadd_ps(xb, e1, acc[r][q][1]);
            }
            if (!odd_k) continue;
            const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
            const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd));
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_broadcast_ss(x + r * ldx + 2 * kk + 1);
                acc[r][q][0] = _mm256_fmadd_ps(xb, o0, acc[r][q][0]);
                acc[r][q][1] = _mm256_fmadd_ps(xb, o1, acc[r][q][1]);
            }
        }
    }
    /* the pack puts column j at pair slot j: the first load's dwords are columns 0-7 */
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++)
            for (int h = 0; h < 2; h++) _mm256_storeu_ps(c + (r * NP + q) * PW + 8 * h, acc[r][q][h]);
}

/* a panel widened to fp32 [K][16] (exact), for blocks of many rows: the micro-kernel is then
 * loads and FMAs only, the shift and mask (on the FMA ports) paid once per panel */
static void widen(const bf16 *p, int K, float *out) {
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    for (int k = 0; k < K; k++)
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + (int64_t)(k / 2) * 2 * PW + 16 * h));
            const __m256i w = k & 1 ? _mm256_and_si256(v, odd) : _mm256_slli_epi32(v, 16);
            _mm256_storeu_ps(out + (int64_t)k * PW + 8 * h, _mm256_castsi256_ps(w));
        }
}

/* micro() on one widened panel: the same FMA per k, so the same bits */
static inline __attribute__((always_inline)) void micro_wide(const float *x, int64_t ldx,
                                                             const float *w, int K, float *c,
                                                             const int R) {
    __m256 acc[RMAX][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(w + (int64_t)k * PW), w1 = _mm256_loadu_ps(w + (int64_t)k * PW + 8);
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(c + r * PW + 8 * h, acc[r][h]);
}

static void micro_wide_any(const float *x, int64_t ldx, const float *w, int K, float *c, int R) {
    switch (R) {
    case 6: return micro_wide(x, ldx, w, K, c, 6);
    case 5: return micro_wide(x, ldx, w, K, c, 5);
    case 4: return micro_wide(x, ldx, w, K, c, 4);
    case 3: return micro_wide(x, ldx, w, K, c, 3);
    case 2: return micro_wide(x, ldx, w, K, c, 2);
    default: return micro_wide(x, ldx, w, K, c, 1);
    }
}
#endif
