/* bf16 linear layers on Intel AMX for batched decode rows (up to a few hundred).
 *
 * PyTorch's oneDNN path reaches ~10 GB/s of weight traffic at 32 rows (SmolLM2-135M, 2 cores):
 * its AMX kernels are tuned for large matrices. Here the weight of every layer is repacked once
 * into AMX's tile layout (16 output columns x 32 inputs per 1 KiB tile, pairs of inputs
 * interleaved as TDPBF16PS wants them), stored in order, so a call streams the weight once and
 * each tile meets up to 32 rows of X in four tile multiplies. Accumulation is fp32; the output
 * is rounded once to bf16 (or kept in fp32), with the bias added in fp32 first. For a greedy
 * step the output projection can instead keep only each row's argmax (no logits written).
 *
 * Linux hands AMX state to a process only on request: `genserve_amx_init` asks for it.
 * Built with -fopenmp against PyTorch's libgomp (see gemm.c).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx.h"
#include "common.h"
#include "vec_math.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* rows of X per pass over the weights in the linear layer: 256 x K bf16 (288 KiB at K=576) stays
 * in L2 while every weight block streams by; past it X would be re-read from L3 once per
 * 32-column block */
#define M_CHUNK 256

int genserve_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

/* W [N, K] row-major -> P [N/16][K/32][16 input pairs][16 outputs][2] */
void genserve_amx_pack_bf16(const bf16 *W, bf16 *P, int N, int K) {
    const int nk = K / 32;
#pragma omp parallel for
    for (int nb = 0; nb < N / 16; nb++)
        for (int kb = 0; kb < nk; kb++) {
            bf16 *tile = P + ((int64_t)nb * nk + kb) * 512;
            for (int kp = 0; kp < 16; kp++)
                for (int n = 0; n < 16; n++) {
                    const bf16 *w = W + (int64_t)(nb * 16 + n) * K + kb * 32 + 2 * kp;
                    tile[kp * 32 + 2 * n] = w[0];
                    tile[kp * 32 + 2 * n + 1] = w[1];
                }
        }
}

/* n bf16s per calling thread (each engine has its own thread) */
static bf16 *xpad_buffer(size_t n) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    return (bf16 *)grow_buffer(&buf, &cap, n * sizeof(bf16));
}

/* The rows of X as 32-row blocks read in place, the last partial block from a zero-padded
 * copy (`tail`, per thread; NULL when M % 32 == 0). Returns -1 when memory ran out. */
static int x_tail(const bf16 *X, int ldx, int M, int K, bf16 **tail) {
    const int Mfull = M / 32 * 32;
    *tail = NULL;
    if (Mfull == M) return 0;
    bf16 *t = xpad_buffer((size_t)32 * K);
    if (!t) return -1;
    for (int m = 0; m < 32; m++) {
        if (Mfull + m < M)
            memcpy(t + (int64_t)m * K, X + (int64_t)(Mfull + m) * ldx, (size_t)K * sizeof(bf16));
        else
            memset(t + (int64_t)m * K, 0, (size_t)K * sizeof(bf16));
    }
    *tail = t;
    return 0;
}

/* c[32 rows][32 columns] (fp32) = 32 rows of X (x0, row stride ld) times the packed column
 * blocks p0 and p1 (p1 NULL: p0 only, columns 16-31 of c left undefined). next0/next1 (or
 * NULL): tiles to prefetch into L2 meanwhile, one per k step: the first row block fetches the
 * next blocks' tiles, so the weight streams from memory at its bandwidth instead of its
 * latency (into L2 rather than L1: the L1 fill buffers stay free for the loads, ~5% faster). */
static inline __attribute__((always_inline)) void amx_block(const bf16 *x0, int64_t ld,
                                                            const bf16 *p0, const bf16 *p1,
                                                            const bf16 *next0, const bf16 *next1,
                                                            int nk, float *c) {
    const int64_t stride = ld * 2;
    const bf16 *x1 = x0 + 16 * ld;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < nk; kb++) {
        if (next0)
            for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)(next0 + (int64_t)kb * 512) + l, _MM_HINT_T1);
        if (next1)
            for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)(next1 + (int64_t)kb * 512) + l, _MM_HINT_T1);
        _tile_loadd(4, x0 + kb * 32, stride);
        _tile_loadd(5, x1 + kb * 32, stride);
        _tile_loadd(6, p0 + (int64_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (p1) {
            _tile_loadd(7, p1 + (int64_t)kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
}

/* The 32 rows of X from m0, for amx_block: in place, or the zero-padded copy of the last ones */
#define X_ROWS(m0) ((m0) < Mfull ? X + (int64_t)(m0) * ldx : tail)
#define X_LD(m0) ((m0) < Mfull ? (int64_t)ldx : (int64_t)K)

/* Y[M, N] = X[M, K] . W^T (+ bias), P from genserve_amx_pack_bf16. K % 32 == 0, N % 16 == 0.
 * Y: bf16 (out_f32 = 0) or fp32, row stride ldy. Returns 0, or -1 (then nothing was written)
 * when the shapes are unsupported or memory ran out. */
int genserve_amx_linear_bf16(const bf16 *X, int ldx, const bf16 *P, const bf16 *bias, void *Y,
                             int ldy, int M, int N, int K, int out_f32) {
    if (K % 32 || N % 16 || M <= 0) return -1;
    const int Mp = (M + 31) / 32 * 32, nk = K / 32, nblocks = N / 16, Mfull = M / 32 * 32;
    const int64_t tile_col = (int64_t)nk * 512; /* elements of one packed 16-column block */
    bf16 *tail;
    if (x_tail(X, ldx, M, K, &tail)) return -1;
#pragma omp parallel
    {
        amx_tiles_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
        /* chunks of M_CHUNK rows (their X stays in L2 while every weight block passes), then
         * pairs of 16-column blocks; an odd last block runs alone. Each output element is still
         * one amx_block over all of K: the same bits at any M. */
        for (int mc = 0; mc < Mp; mc += M_CHUNK) {
            const int mend = mc + M_CHUNK < Mp ? mc + M_CHUNK : Mp;
#pragma omp for schedule(static)
        for (int pb = 0; pb < (nblocks + 1) / 2; pb++) {
            const int nb = 2 * pb, two = nb + 1 < nblocks;
            const bf16 *p0 = P + nb * tile_col;
            for (int m0 = mc; m0 < mend; m0 += 32) {
                amx_block(X_ROWS(m0), X_LD(m0), p0, two ? p0 + tile_col : NULL,
                          m0 == mc && nb + 2 < nblocks ? p0 + 2 * tile_col : NULL,
                          m0 == mc && nb + 3 < nblocks ? p0 + 3 * tile_col : NULL, nk, c);
                const int rows = M - m0 < 32 ? M - m0 : 32;
                for (int h = 0; h <= two; h++) {
                    const int n = (nb + h) * 16;
                    const __m512 b = bias ? load_bf16x16(bias + n) : _mm512_setzero_ps();
                    for (int r = 0; r < rows; r++) {
                        const int64_t m = m0 + r;
                        const __m512 v = _mm512_add_ps(_mm512_load_ps(c + r * 32 + 16 * h), b);
                        if (out_f32)
                            _mm512_storeu_ps((float *)Y + m * ldy + n, v);
                        else
                            _mm256_storeu_si256((__m256i *)((bf16 *)Y + m * ldy + n), (__m256i)_mm512_cvtneps_pbh(v));
                    }
                }
            }
        }
        }
        _tile_release();
    }
    return 0;
}

/* act[M, I] = bf16(bf16(silu(g)) * u) for [g | u] = X . W^T, W the [2 I, K] gate and up
 * projections stacked (gate rows first), packed by genserve_amx_pack_bf16: the gate_up linear
 * and silu_and_mul in one pass, without the [M, 2 I] buffer. Each step pairs the gate's
 * column block j with the up projection's block j; both are rounded to bf16 first, so `act`
 * is exactly genserve_silu_mul_bf16 of genserve_amx_linear_bf16's output. I % 16 == 0.
 * Returns 0, or -1 (nothing written) as genserve_amx_linear_bf16. */
int genserve_amx_glu_bf16(const bf16 *X, int ldx, const bf16 *P, bf16 *act, int ldact, int M,
                          int I, int K) {
    if (K % 32 || I % 16 || M <= 0) return -1;
    const int Mp = (M + 31) / 32 * 32, nk = K / 32, nblocks = I / 16, Mfull = M / 32 * 32;
    const int64_t tile_col = (int64_t)nk * 512, up = (int64_t)nblocks * tile_col;
    bf16 *tail;
    if (x_tail(X, ldx, M, K, &tail)) return -1;
#pragma omp parallel
    {
        amx_tiles_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
        for (int mc = 0; mc < Mp; mc += M_CHUNK) { /* as in genserve_amx_linear_bf16 */
            const int mend = mc + M_CHUNK < Mp ? mc + M_CHUNK : Mp;
#pragma omp for schedule(static)
        for (int j = 0; j < nblocks; j++) {
            const bf16 *g = P + j * tile_col;
            for (int m0 = mc; m0 < mend; m0 += 32) {
                const int more = m0 == mc && j + 1 < nblocks;
                amx_block(X_ROWS(m0), X_LD(m0), g, g + up, more ? g + tile_col : NULL,
                          more ? g + up + tile_col : NULL, nk, c);
                const int rows = M - m0 < 32 ? M - m0 : 32;
                for (int r = 0; r < rows; r++) {
                    const __m512 gv = round_bf16x16(_mm512_load_ps(c + r * 32));
                    const __m512 uv = round_bf16x16(_mm512_load_ps(c + r * 32 + 16));
                    _mm256_storeu_si256((__m256i *)(act + (int64_t)(m0 + r) * ldact + j * 16),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu_bf16x16(gv), uv)));
                }
            }
        }
        }
        _tile_release();
    }
    return 0;
}

/* out[m] = argmax over columns n < n_valid of (X . W^T)[m, n]: the output projection and a
 * greedy choice in one pass, without writing the [M, N] fp32 logits. The values are those
 * genserve_amx_linear_bf16 computes (same tiles, same order), and the choice is that of
 * genserve_argmax_f32 on them: the first maximum, NaN never chosen, 0 for a row of -inf.
 * With `logprob` (else NULL), also logprob[m] = that maximum - logsumexp of the row's values
 * (NaN ignored), from a running sum of exp(value - running max) per lane.
 * Each thread keeps, per row and lane, the best value, its column and that sum; threads and
 * lanes are merged at the end. Returns 0, or -1 (nothing written) as genserve_amx_linear_bf16. */
int genserve_amx_linear_argmax_bf16(const bf16 *X, int ldx, const bf16 *P, int M, int N, int K,
                                    int n_valid, int64_t *out, float *logprob) {
    if (K % 32 || N % 16 || M <= 0 || n_valid <= 0 || n_valid > N) return -1;
    const int Mp = (M + 31) / 32 * 32, nk = K / 32, Mfull = M / 32 * 32;
    const int nblocks = (n_valid + 15) / 16; /* column blocks wholly past n_valid: skipped */
    const int64_t tile_col = (int64_t)nk * 512;
    bf16 *tail;
    if (x_tail(X, ldx, M, K, &tail)) return -1;
    const int nth = omp_get_max_threads();
    /* per thread and row, 48 lanes: 16 maxima, their 16 columns, 16 sums of exp(v - max) */
    char *lanes = aligned_alloc(64, (size_t)nth * M * 192);
    if (!lanes) return -1;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int used = 1;
#pragma omp parallel num_threads(nth)
    {
        amx_tiles_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
        const int tid = omp_get_thread_num();
        float *bv = (float *)(lanes + (size_t)tid * M * 192);
#pragma omp single
        used = omp_get_num_threads();
        for (int r = 0; r < M; r++) {
            _mm512_store_ps(bv + r * 48, _mm512_set1_ps(-INFINITY));
            _mm512_store_si512((__m512i *)(bv + r * 48 + 16), _mm512_setzero_si512());
            _mm512_store_ps(bv + r * 48 + 32, _mm512_setzero_ps());
        }
#pragma omp for schedule(static)
        for (int pb = 0; pb < (nblocks + 1) / 2; pb++) {
            const int nb = 2 * pb, two = nb + 1 < nblocks;
            for (int m0 = 0; m0 < Mp; m0 += 32) {
                const bf16 *p0 = P + nb * tile_col;
                amx_block(X_ROWS(m0), X_LD(m0), p0, two ? p0 + tile_col : NULL,
                          m0 == 0 && nb + 2 < nblocks ? p0 + 2 * tile_col : NULL,
                          m0 == 0 && nb + 3 < nblocks ? p0 + 3 * tile_col : NULL, nk, c);
                const int rows = M - m0 < 32 ? M - m0 : 32;
                for (int h = 0; h <= two; h++) {
                    const int n = (nb + h) * 16;
                    const __mmask16 in = n_valid - n >= 16 ? (__mmask16)0xffff
                                                           : (__mmask16)((1u << (n_valid - n)) - 1);
                    const __m512i col = _mm512_add_epi32(iota, _mm512_set1_epi32(n));
                    for (int r = 0; r < rows; r++) {
                        float *s = bv + (m0 + r) * 48;
                        const __m512 v = _mm512_load_ps(c + r * 32 + 16 * h), best = _mm512_load_ps(s);
                        const __mmask16 gt = _mm512_mask_cmp_ps_mask(in, v, best, _CMP_GT_OQ);
                        const __m512 top = _mm512_mask_mov_ps(best, gt, v);
                        _mm512_store_ps(s, top);
                        _mm512_store_si512((__m512i *)(s + 16),
                                           _mm512_mask_mov_epi32(_mm512_load_si512((const __m512i *)(s + 16)), gt, col));
                        if (logprob) {
                            __m512 sum = _mm512_load_ps(s + 32);
                            if (gt) /* a lane's maximum rose: rescale its sum */
                                sum = _mm512_mask_mul_ps(sum, gt, sum, exp512(_mm512_sub_ps(best, top)));
                            const __mmask16 ok = _mm512_mask_cmp_ps_mask(in, v, v, _CMP_ORD_Q);
                            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(ok, exp512(_mm512_sub_ps(v, top))));
                            _mm512_store_ps(s + 32, sum);
                        }
                    }
                }
            }
        }
        _tile_release();
    }
    for (int r = 0; r < M; r++) {
        float best = -INFINITY;
        int64_t at = 0;
        for (int t = 0; t < used; t++) {
            const float *s = (const float *)(lanes + (size_t)t * M * 192) + r * 48;
            const int32_t *idx = (const int32_t *)(s + 16);
            for (int l = 0; l < 16; l++)
                if (s[l] > best || (s[l] == best && best > -INFINITY && idx[l] < at)) {
                    best = s[l];
                    at = idx[l];
                }
        }
        out[r] = at;
        if (logprob) { /* max - (max + log sum exp(v - max)) */
            double total = 0.0;
            for (int t = 0; t < used; t++) {
                const float *s = (const float *)(lanes + (size_t)t * M * 192) + r * 48;
                for (int l = 0; l < 16; l++)
                    if (s[l] > -INFINITY) total += (double)s[32 + l] * exp((double)s[l] - best);
            }
            logprob[r] = best > -INFINITY ? (float)-log(total) : NAN;
        }
    }
    free(lanes);
    return 0;
}
