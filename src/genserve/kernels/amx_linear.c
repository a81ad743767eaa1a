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
 * Built with -fopenmp against PyTorch's libgomp (see decode_bf16.c).
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

typedef uint16_t bf16;

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

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

/* c[32 rows][32 columns] (fp32) = the 32 rows of X from m0 times column blocks nb and nb + 1
 * (only nb when `two` is 0). While the first row block multiplies, the next column pair's
 * tiles are prefetched into L2: the weight streams from memory at its bandwidth instead of its
 * latency (into L2 rather than L1: the L1 fill buffers stay free for the loads, ~5% faster). */
static inline __attribute__((always_inline)) void amx_block(const bf16 *X, int64_t ldx,
                                                            const bf16 *tail, int Mfull,
                                                            const bf16 *P, int nb, int nblocks,
                                                            int nk, int K, int m0, float *c) {
    const int two = nb + 1 < nblocks;
    const bf16 *p0 = P + (int64_t)nb * nk * 512, *p1 = p0 + (int64_t)nk * 512;
    const bf16 *x0 = m0 < Mfull ? X + (int64_t)m0 * ldx : tail;
    const int64_t ld = m0 < Mfull ? ldx : K, stride = ld * 2;
    const bf16 *x1 = x0 + 16 * ld;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < nk; kb++) {
        if (m0 == 0 && nb + 2 < nblocks) {
            const char *nx = (const char *)(p0 + (int64_t)2 * nk * 512 + (int64_t)kb * 512);
            for (int l = 0; l < 1024; l += 64) _mm_prefetch(nx + l, _MM_HINT_T1);
            if (nb + 3 < nblocks)
                for (int l = 0; l < 1024; l += 64) _mm_prefetch(nx + (int64_t)nk * 1024 + l, _MM_HINT_T1);
        }
        _tile_loadd(4, x0 + kb * 32, stride);
        _tile_loadd(5, x1 + kb * 32, stride);
        _tile_loadd(6, p0 + (int64_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
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

/* Y[M, N] = X[M, K] . W^T (+ bias), P from genserve_amx_pack_bf16. K % 32 == 0, N % 16 == 0.
 * Y: bf16 (out_f32 = 0) or fp32, row stride ldy. Returns 0, or -1 (then nothing was written)
 * when the shapes are unsupported or memory ran out. */
int genserve_amx_linear_bf16(const bf16 *X, int ldx, const bf16 *P, const bf16 *bias, void *Y,
                             int ldy, int M, int N, int K, int out_f32) {
    if (K % 32 || N % 16 || M <= 0) return -1;
    const int Mp = (M + 31) / 32 * 32, nk = K / 32, nblocks = N / 16, Mfull = M / 32 * 32;
    bf16 *tail;
    if (x_tail(X, ldx, M, K, &tail)) return -1;
#pragma omp parallel
    {
        amx_tiles_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
        /* pairs of 16-column blocks; an odd last block runs alone */
#pragma omp for schedule(static)
        for (int pb = 0; pb < (nblocks + 1) / 2; pb++) {
            const int nb = 2 * pb, two = nb + 1 < nblocks;
            for (int m0 = 0; m0 < Mp; m0 += 32) {
                amx_block(X, ldx, tail, Mfull, P, nb, nblocks, nk, K, m0, c);
                const int rows = M - m0 < 32 ? M - m0 : 32;
                for (int h = 0; h <= two; h++) {
                    const int n = (nb + h) * 16;
                    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n))), 16))
                                          : _mm512_setzero_ps();
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
        _tile_release();
    }
    return 0;
}

/* out[m] = argmax over columns n < n_valid of (X . W^T)[m, n]: the output projection and a
 * greedy choice in one pass, without writing the [M, N] fp32 logits. The values are those
 * genserve_amx_linear_bf16 computes (same tiles, same order), and the choice is that of
 * genserve_argmax_f32 on them: the first maximum, NaN never chosen, 0 for a row of -inf. Each
 * thread keeps, per row, the best value and its column in each of 16 lanes; threads and lanes
 * are merged at the end. Returns 0, or -1 (nothing written) as genserve_amx_linear_bf16. */
int genserve_amx_linear_argmax_bf16(const bf16 *X, int ldx, const bf16 *P, int M, int N, int K,
                                    int n_valid, int64_t *out) {
    if (K % 32 || N % 16 || M <= 0 || n_valid <= 0 || n_valid > N) return -1;
    const int Mp = (M + 31) / 32 * 32, nk = K / 32, Mfull = M / 32 * 32;
    const int nblocks = (n_valid + 15) / 16; /* column blocks wholly past n_valid: skipped */
    bf16 *tail;
    if (x_tail(X, ldx, M, K, &tail)) return -1;
    const int nth = omp_get_max_threads();
    /* per thread and row: 16 lane maxima, then their 16 columns */
    char *lanes = aligned_alloc(64, (size_t)nth * M * 128);
    if (!lanes) return -1;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int used = 1;
#pragma omp parallel num_threads(nth)
    {
        amx_tiles_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
        const int tid = omp_get_thread_num();
        float *bv = (float *)(lanes + (size_t)tid * M * 128);
#pragma omp single
        used = omp_get_num_threads();
        for (int r = 0; r < M; r++) {
            _mm512_store_ps(bv + r * 32, _mm512_set1_ps(-INFINITY));
            _mm512_store_si512((__m512i *)(bv + r * 32 + 16), _mm512_setzero_si512());
        }
#pragma omp for schedule(static)
        for (int pb = 0; pb < (nblocks + 1) / 2; pb++) {
            const int nb = 2 * pb, two = nb + 1 < nblocks;
            for (int m0 = 0; m0 < Mp; m0 += 32) {
                amx_block(X, ldx, tail, Mfull, P, nb, nblocks, nk, K, m0, c);
                const int rows = M - m0 < 32 ? M - m0 : 32;
                for (int h = 0; h <= two; h++) {
                    const int n = (nb + h) * 16;
                    const __mmask16 in = n_valid - n >= 16 ? (__mmask16)0xffff
                                                           : (__mmask16)((1u << (n_valid - n)) - 1);
                    const __m512i col = _mm512_add_epi32(iota, _mm512_set1_epi32(n));
                    for (int r = 0; r < rows; r++) {
                        float *s = bv + (m0 + r) * 32;
                        const __m512 v = _mm512_load_ps(c + r * 32 + 16 * h), best = _mm512_load_ps(s);
                        const __mmask16 gt = _mm512_mask_cmp_ps_mask(in, v, best, _CMP_GT_OQ);
                        _mm512_store_ps(s, _mm512_mask_mov_ps(best, gt, v));
                        _mm512_store_si512((__m512i *)(s + 16),
                                           _mm512_mask_mov_epi32(_mm512_load_si512((const __m512i *)(s + 16)), gt, col));
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
            const float *s = (const float *)(lanes + (size_t)t * M * 128) + r * 32;
            const int32_t *idx = (const int32_t *)(s + 16);
            for (int l = 0; l < 16; l++)
                if (s[l] > best || (s[l] == best && best > -INFINITY && idx[l] < at)) {
                    best = s[l];
                    at = idx[l];
                }
        }
        out[r] = at;
    }
    free(lanes);
    return 0;
}
