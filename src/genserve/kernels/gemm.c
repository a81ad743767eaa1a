/* Y = X W^T (+ bias) on bf16 weights W [N, K] (row-major, as PyTorch stores a linear's weight),
 * bf16 rows X [M, K], fp32 accumulation, Y in fp32 or rounded once to bf16.
 *
 * Batch invariance: every output element Y[m, n] is one chain of fp32 operations over K in a
 * fixed order (lane l of a vector accumulator takes the products k = l, l + VL, ... in
 * order; then one fixed horizontal sum, then the bias), whatever M, the row's place in X, the
 * block it falls in or the thread count: the single-row path and the batched one give the same
 * bits for the same row.
 *
 * Built with -fopenmp against the libgomp PyTorch has already loaded (same soname), so it shares
 * PyTorch's thread pool instead of starting a second one.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "vec_math.h"

static inline void store_out(void *Y, int64_t at, float v, int mode) {
    if (mode == OUT_F32) ((float *)Y)[at] = v;
    else if (mode == OUT_BF16) ((bf16 *)Y)[at] = f2bf(v);
    else ((bf16 *)Y)[at] = f2bf(bf2f(((bf16 *)Y)[at]) + rbf(v));
}

#if defined(__AVX512BF16__)
/* vdpbf16ps over 32 k at a time: lane l accumulates the pairs (32c + 2l, 32c + 2l + 1) */
#define ROWS 4   /* rows of W per register block */
#define MCHUNK 4 /* rows of X per register block */
#ifndef PF_ROWS
#define PF_ROWS 8 /* software prefetch distance, in rows of W: about one block ahead */
#endif

static inline __m512bh load_bh(const bf16 *p, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

static void gemm_band(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy,
                      int M, int K, int n0, int n1, int mode) {
    const int full = K / 32, tail = K % 32;
    const __mmask32 tmask = (__mmask32)((1ull << tail) - 1);
    for (int n = n0; n < n1; n += ROWS) {
        const int rows = (n1 - n) < ROWS ? (n1 - n) : ROWS;
        for (int m0 = 0; m0 < M; m0 += MCHUNK) {
            const int ms = (M - m0) < MCHUNK ? (M - m0) : MCHUNK;
            __m512 acc[ROWS][MCHUNK];
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < MCHUNK; j++) acc[r][j] = _mm512_setzero_ps();
            const int chunks = full + (tail ? 1 : 0);
            for (int c = 0; c < chunks; c++) {
                const __mmask32 mask = c < full ? (__mmask32)0xffffffffu : tmask;
                const int k = c * 32;
                __m512bh xv[MCHUNK];
                if (m0 == 0)
                    for (int r = 0; r < ROWS; r++)
                        _mm_prefetch((const char *)(W + (int64_t)(n + PF_ROWS + r) * K + k), _MM_HINT_T0);
                for (int j = 0; j < ms; j++) xv[j] = load_bh(X + (int64_t)(m0 + j) * ldx + k, mask);
                for (int r = 0; r < rows; r++) {
                    const __m512bh wv = load_bh(W + (int64_t)(n + r) * K + k, mask);
                    for (int j = 0; j < ms; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
                }
            }
            for (int r = 0; r < rows; r++) {
                const float b = bias ? bf2f(bias[n + r]) : 0.0f;
                for (int j = 0; j < ms; j++)
                    store_out(Y, (int64_t)(m0 + j) * ldy + n + r, _mm512_reduce_add_ps(acc[r][j]) + b, mode);
            }
        }
    }
}

/* M == 1, the single-stream case: 8 rows per block, fully unrolled, so the loop is nothing but
 * loads and dot products and the weight stream runs at memory speed. Same chain per element as
 * gemm_band (same chunks, same tail mask, same reduction). */
static void gemv1_band(const bf16 *W, const bf16 *bias, const bf16 *X, void *Y, int K, int n0,
                       int n1, int mode) {
    const int full = K / 32, tail = K % 32;
    const __mmask32 tmask = (__mmask32)((1ull << tail) - 1);
    int n = n0;
    for (; n + 8 <= n1; n += 8) {
        const bf16 *w = W + (int64_t)n * K;
        __m512 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
        for (int c = 0; c < full; c++) {
            const int k = c * 32;
            const __m512bh xv = load_bh(X + k, ~0u);
            for (int r = 0; r < 8; r++) _mm_prefetch((const char *)(w + (PF_ROWS + r) * K + k), _MM_HINT_T0);
            for (int r = 0; r < 8; r++) a[r] = _mm512_dpbf16_ps(a[r], load_bh(w + r * K + k, ~0u), xv);
        }
        if (tail) {
            const int k = full * 32;
            const __m512bh xv = load_bh(X + k, tmask);
            for (int r = 0; r < 8; r++) a[r] = _mm512_dpbf16_ps(a[r], load_bh(w + r * K + k, tmask), xv);
        }
        for (int r = 0; r < 8; r++)
            store_out(Y, n + r, _mm512_reduce_add_ps(a[r]) + (bias ? bf2f(bias[n + r]) : 0.0f), mode);
    }
    if (n < n1) gemm_band(W, bias, X, 0, Y, 0, 1, K, n, n1, mode);
}

int gemm_omp(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy, int M,
             int N, int K, int mode) {
    int n0, n1;
    thread_band(N, ROWS, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
    if (n0 >= n1) return 0;
    if (M == 1) gemv1_band(W, bias, X, Y, K, n0, n1, mode);
    else gemm_band(W, bias, X, ldx, Y, ldy, M, K, n0, n1, mode);
    return 0;
}

#else
/* AVX2 + FMA. Each 16 k of a W row are one 256-bit load: a dword holds k (low half) and k + 1
 * (high half), so a shift gives the even k as fp32 and a mask the odd ones, no shuffles. X is
 * converted once per call into the same order (per 16 k: the 8 even, then the 8 odd, as fp32,
 * zero-padded to whole chunks), so the kernel is loads and FMAs. Chain per element: lane l
 * takes k = 16c + 2l, then 16c + 2l + 1, for c = 0, 1, ...; then hsum8, then the bias. */
/* Block sizes measured on a 2-core Sapphire Rapids slice (K=576, N=3072, M=48): a 4 x 2
 * register block (8 accumulators, both X rows' chunks held in registers) beat 4 x 3, 3 x 2 and
 * 2 x 4 by 10-40%; NB and MB hardly mattered. */
#define NB 64 /* rows of W per L2 block */
#define MB 48 /* rows of X converted at a time */
#define RB 4  /* rows of W per register block */
#define CB 2  /* rows of X per register block */
/* M = 1 streams W from memory: each row's line 16 rows (two blocks) ahead is prefetched once
 * (every other 32-byte chunk); one block ahead, or every chunk, streamed lm_head's 56 MB at
 * half the rate (13-16 vs 26-28 GB/s, one thread). */
#define PF_AHEAD 16

/* X rows [m0, m0 + ms) -> xf [ms][kp] fp32 in chunk order */
static void convert_rows(const bf16 *X, int ldx, int m0, int ms, int K, int kp, float *xf) {
    for (int j = 0; j < ms; j++) {
        const bf16 *x = X + (int64_t)(m0 + j) * ldx;
        float *o = xf + (int64_t)j * kp;
        for (int k = 0; k < kp; k++) o[(k & ~15) + ((k & 1) << 3) + ((k & 15) >> 1)] = k < K ? bf2f(x[k]) : 0.0f;
    }
}

/* R rows of W (up to 8) times C converted rows of X (up to CB), every chunk; W rows past K read from a zero-padded
 * copy of their last chunk. Inlined with constant R, C so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_block(const bf16 *W, int K, int kp,
                                                            const float *xf, const bf16 *bias,
                                                            void *Y, int64_t ldy, int n, int m,
                                                            int mode, const int R, const int C,
                                                            const int pf) {
    __m256 acc[8][CB];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    const int full = K / 16;
    for (int ch = 0; ch < kp / 16; ch++) {
        const int k = ch * 16;
        bf16 tail[8][16];
        for (int r = 0; r < R; r++) {
            const bf16 *w = W + (int64_t)(n + r) * K + k;
            if (ch >= full) { /* the last, partial chunk */
                memset(tail[r], 0, sizeof tail[r]);
                memcpy(tail[r], w, (size_t)(K - k) * sizeof(bf16));
                w = tail[r];
            } else if (pf && !(ch & 1)) {
                _mm_prefetch((const char *)(w + (int64_t)PF_AHEAD * K), _MM_HINT_T0);
            }
            const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
            for (int c = 0; c < C; c++) {
                const float *x = xf + (int64_t)c * kp + k;
                acc[r][c] = _mm256_fmadd_ps(we, _mm256_load_ps(x), acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(wo, _mm256_load_ps(x + 8), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const float b = bias ? bf2f(bias[n + r]) : 0.0f;
        for (int c = 0; c < C; c++) store_out(Y, (int64_t)(m + c) * ldy + n + r, hsum8(acc[r][c]) + b, mode);
    }
}

static void dot_any(const bf16 *W, int K, int kp, const float *xf, const bf16 *bias, void *Y,
                    int64_t ldy, int n, int m, int mode, int R, int C) {
#define DOT_CASE(r, c) \
    if (R == r && C == c) return dot_block(W, K, kp, xf, bias, Y, ldy, n, m, mode, r, c, 0);
    DOT_CASE(4, 2) DOT_CASE(4, 1) DOT_CASE(3, 2) DOT_CASE(3, 1) DOT_CASE(2, 2) DOT_CASE(2, 1) DOT_CASE(1, 2) DOT_CASE(1, 1)
#undef DOT_CASE
}

static float *pack_buffer(size_t n) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    return (float *)grow_buffer(&buf, &cap, n * sizeof(float));
}

int gemm_omp(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy, int M,
             int N, int K, int mode) {
    int n0, n1;
    thread_band(N, 8, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
    if (n0 >= n1) return 0;
    const int kp = (K + 15) / 16 * 16;
    float *xf = pack_buffer((size_t)(M < MB ? M : MB) * kp);
    if (!xf) return -1; /* this thread's band is not written */
    if (M == 1) { /* stream W once at memory speed: 8 rows a block, prefetched ahead */
        convert_rows(X, ldx, 0, 1, K, kp, xf);
        int n = n0;
        for (; n + 8 <= n1; n += 8) dot_block(W, K, kp, xf, bias, Y, ldy, n, 0, mode, 8, 1, 1);
        for (; n < n1; n++) dot_block(W, K, kp, xf, bias, Y, ldy, n, 0, mode, 1, 1, 0);
        return 0;
    }
    for (int m0 = 0; m0 < M; m0 += MB) {
        const int ms = M - m0 < MB ? M - m0 : MB;
        convert_rows(X, ldx, m0, ms, K, kp, xf);
        for (int nb = n0; nb < n1; nb += NB) { /* this W block stays in L2 over the X rows */
            const int ne = nb + NB < n1 ? nb + NB : n1;
            for (int j = 0; j < ms; j += CB) {
                const int c = ms - j < CB ? ms - j : CB;
                for (int n = nb; n < ne; n += RB)
                    dot_any(W, K, kp, xf + (int64_t)j * kp, bias, Y, ldy, n, m0 + j, mode,
                            ne - n < RB ? ne - n : RB, c);
            }
        }
    }
    return 0;
}
#endif

/* Y = X W^T (+ bias): X [M, K] bf16 (row stride ldx), W [N, K] bf16, Y fp32 or bf16 [M, ldy].
 * Returns 0, or -1 when a thread could not get its X buffer (Y then incomplete). */
int genserve_gemm_bf16(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy,
                       int M, int N, int K, int out_f32) {
    int failed = 0;
#pragma omp parallel
    if (gemm_omp(W, bias, X, ldx, Y, ldy, M, N, K, out_f32 ? OUT_F32 : OUT_BF16)) {
#pragma omp atomic write
        failed = 1;
    }
    return failed ? -1 : 0;
}
