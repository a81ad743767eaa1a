/* bf16 linear layers on panel-packed weights, for every kernel set (the CPUs without AMX run
 * every linear of every step here; the amx set builds it too, on its AVX-512 path).
 *
 * Layout: the weight W [N, K] is repacked once at load into panels of 16 output columns,
 * K-major, pairs of k interleaved: P [ceil(N/16)][ceil(K/2)][16][2] bf16, element
 * (n, k) at ((n/16 * ceil(K/2) + k/2) * 16 + n%16) * 2 + k%2, zero past N and K. (For
 * N % 16 == 0 and K % 32 == 0 this is exactly amx_linear.c's tile layout.) One 64-byte line
 * holds 16 columns at k and k + 1: AVX-512-BF16 feeds it to vdpbf16ps as it is; AVX2 widens
 * the even k with a shift and the odd k with a mask (no shuffles).
 *
 * One register-blocked micro-kernel (R rows of X broadcast against NP panels) serves every M.
 * Batch invariance: element (m, n) is one fp32 chain over k from a zero accumulator, in
 * order, whatever R, NP, the row's place, M or the thread count: AVX2 one FMA per k
 * (k = 0, 1, 2, ...); AVX-512 one vdpbf16ps per pair (0, 1), (2, 3), ... (the last pair of
 * an odd K with x = 0 beside it); then + bias, then the one rounding. The blocking only
 * decides which elements are computed together. Threads split the panels, never K.
 *
 * Built with -fopenmp against PyTorch's libgomp (see gemm.c).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "panel_micro.h"
#include "vec_math.h"

static inline int64_t panel_elems(int K) { return (int64_t)(K + 1) / 2 * 2 * PW; }

/* bf16 elements of P for a [N, K] weight */
int64_t genserve_panel_packed_size(int N, int K) {
    return (int64_t)(N + PW - 1) / PW * panel_elems(K);
}

/* W [N, K] row-major -> P as above (P holds genserve_panel_packed_size(N, K) elements) */
void genserve_panel_pack_bf16(const bf16 *W, bf16 *P, int N, int K) {
    const int npan = (N + PW - 1) / PW, kp = (K + 1) / 2;
#pragma omp parallel for
    for (int p = 0; p < npan; p++)
        for (int kk = 0; kk < kp; kk++) {
            bf16 *o = P + p * panel_elems(K) + (int64_t)kk * 2 * PW;
            for (int j = 0; j < PW; j++) {
                const int n = p * PW + j, k = 2 * kk;
                o[2 * j] = n < N ? W[(int64_t)n * K + k] : 0;
                o[2 * j + 1] = n < N && k + 1 < K ? W[(int64_t)n * K + k + 1] : 0;
            }
        }
}

/* micro() with R, NP constant, for the shapes the drivers use; any other shape panel by panel */
static void micro_any(const xelem *x, int64_t ldx, const bf16 *const *p, int K, float *c, int R,
                      int NP, int64_t pf) {
#define MK(r, np) \
    if (R == r && NP == np) return micro(x, ldx, p, K, c, r, np, pf);
#if X_CONVERTED
    MK(1, 4) MK(2, 3) MK(3, 2) MK(6, 1) MK(5, 1) MK(4, 1) MK(3, 1) MK(2, 1) MK(1, 1)
    MK(1, 2) MK(2, 2) MK(1, 3)
#else
    MK(1, 8) MK(2, 8) MK(6, 4) MK(5, 4) MK(4, 4) MK(3, 4) MK(2, 4) MK(1, 4) MK(6, 2) MK(5, 2)
    MK(4, 2) MK(3, 2) MK(2, 2) MK(1, 2) MK(6, 1) MK(5, 1) MK(4, 1) MK(3, 1) MK(2, 1) MK(1, 1)
#endif
#undef MK
    float one[RMAX * PW];
    for (int q = 0; q < NP; q++) {
        micro_any(x, ldx, p + q, K, one, R, 1, pf);
        for (int r = 0; r < R; r++) memcpy(c + (r * NP + q) * PW, one + r * PW, PW * sizeof(float));
    }
}

/* Register block (R rows x NP panels) and rows per X block, by M: M = 1 keeps NP panels'
 * streams in flight (memory speed); larger M reuses each loaded W vector over R rows. */
#if X_CONVERTED
static void block_shape(int M, int *R, int *NP) {
    *R = M == 1 ? 1 : M == 2 ? 2 : M == 3 ? 3 : 6;
    *NP = M == 1 ? 4 : M == 2 ? 3 : M == 3 ? 2 : 1;
}
#else
static void block_shape(int M, int *R, int *NP) {
    *R = M <= 2 ? M : 6;
    *NP = M <= 2 ? 8 : 4;
}
#endif
#define MB 192 /* rows of X per block: fp32 [MB, K] (AVX2) stays in L2 while the panels pass */

typedef struct {
    const bf16 *P;
    int64_t pe;   /* elements per panel */
    int npan;     /* panels of the output (GLU: of the gate) */
    int64_t up;   /* GLU: elements from a gate panel to its up panel, else 0 */
    const bf16 *bias;
    void *Y;
    int ldy, N, mode; /* OUT_F32, OUT_BF16, GLU or ARGMAX */
    struct Pick *picks; /* ARGMAX: [M][npan] */
    int lse;            /* ARGMAX: also each panel's sum of exp */
} Out;
enum { GLU = 3, ARGMAX = 4 };

/* ARGMAX: one row's 16 columns of one panel: the first maximum (NaN never chosen; -inf and
 * `at` = -1 when none) and the sum of exp(v - best) over its non-NaN values */
typedef struct Pick {
    float best, sum;
    int32_t at, pad;
} Pick;

static void pick16(const Out *o, const float *c, int n, Pick *pk) {
    pk->best = -INFINITY;
    pk->at = -1;
    pk->sum = 0.0f;
    const int nv = o->N - n < PW ? o->N - n : PW; /* o->N: n_valid */
    for (int j = 0; j < nv; j++)
        if (c[j] > pk->best) {
            pk->best = c[j];
            pk->at = n + j;
        }
    if (o->lse && pk->best > -INFINITY)
        for (int j = 0; j < nv; j++)
            if (c[j] == c[j]) pk->sum += expf(c[j] - pk->best);
}

static inline void store16(const Out *o, const float *c, const bf16 *bias, int64_t at, int n) {
    for (int j = 0; j < PW; j += VL) {
        vfloat v = v_loadu(c + j);
        if (bias) v = v_add(v, v_load_bf16(bias + n + j));
        if (o->mode == OUT_F32) v_storeu((float *)o->Y + at + j, v);
        else v_store_bf16((bf16 *)o->Y + at + j, v);
    }
}

/* rows m0.. (R of them) of the output panels q0.. (NP of them) from c [R][NP][16] (GLU: cu,
 * the up projection's, beside the gate's c) */
static void epilogue(const Out *o, const float *c, const float *cu, int m0, int R, int q0,
                     int NP) {
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++) {
            const int n = (q0 + q) * PW;
            const float *cr = c + (r * NP + q) * PW;
            const int64_t at = (int64_t)(m0 + r) * o->ldy + n;
            if (o->mode == ARGMAX) {
                pick16(o, cr, n, o->picks + (int64_t)(m0 + r) * o->npan + q0 + q);
            } else if (o->mode == GLU) { /* I % 16 == 0: every panel whole */
                const float *ur = cu + (r * NP + q) * PW;
                for (int j = 0; j < PW; j += VL)
                    v_store_bf16((bf16 *)o->Y + at + j,
                                 v_mul(v_silu_bf16(v_round_bf16(v_loadu(cr + j))), v_round_bf16(v_loadu(ur + j))));
            } else if (n + PW <= o->N) {
                store16(o, cr, o->bias, at, n);
            } else {
                for (int j = 0; n + j < o->N; j++) {
                    const float v = cr[j] + (o->bias ? bf2f(o->bias[n + j]) : 0.0f);
                    if (o->mode == OUT_F32) ((float *)o->Y)[at + j] = v;
                    else ((bf16 *)o->Y)[at + j] = f2bf(v);
                }
            }
        }
}

#if X_CONVERTED
/* n floats per calling thread (each engine has its own), kept from call to call */
static float *x_buffer(size_t n) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    return (float *)grow_buffer(&buf, &cap, n * sizeof(float));
}
#endif

/* The output lines of rows m0.. (R of them), panels q0.. (NP of them): fetched for writing
 * while the micro-kernel runs the row block before them, since a large Y is not in L2 and a
 * store to a missing line waits for it. */
static inline void prefetch_out(const Out *o, int m0, int R, int q0, int NP) {
    if (o->mode == ARGMAX) return;
    const int esz = o->mode == OUT_F32 ? 4 : 2;
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++)
            __builtin_prefetch((const char *)o->Y + ((int64_t)(m0 + r) * o->ldy + (q0 + q) * PW) * esz, 1, 3);
}

/* Rows [r0, ms) of the X block xb against the output panels q0.. (nq of them, a register
 * block), then the epilogue. wide (AVX2, NULL elsewhere): per-thread room for two widened
 * panels, used when the block has full-height (R = 6) register rows. */
static void panel_group(const Out *o, const xelem *xb, int64_t ldxs, int m0, int ms, int K,
                        int R, int q0, int nq, float *wide) {
    float c[RMAX * NPMAX * PW], cu[RMAX * NPMAX * PW];
    const bf16 *p[NPMAX], *pu[NPMAX];
    for (int i = 0; i < nq; i++) {
        p[i] = o->P + (q0 + i) * o->pe;
        pu[i] = p[i] + o->up;
    }
#if X_CONVERTED
    if (R == RMAX && nq == 1) {
        widen(p[0], K, wide);
        if (o->up) widen(pu[0], K, wide + (int64_t)K * PW);
        for (int r0 = 0; r0 < ms; r0 += R) {
            const int rr = ms - r0 < R ? ms - r0 : R;
            if (r0 + R < ms) prefetch_out(o, m0 + r0 + R, ms - r0 - R < R ? ms - r0 - R : R, q0, 1);
            micro_wide_any(xb + r0 * ldxs, ldxs, wide, K, c, rr);
            if (o->up) micro_wide_any(xb + r0 * ldxs, ldxs, wide + (int64_t)K * PW, K, cu, rr);
            epilogue(o, c, cu, m0 + r0, rr, q0, 1);
        }
        return;
    }
#endif
    (void)wide;
    for (int r0 = 0; r0 < ms; r0 += R) {
        const int rr = ms - r0 < R ? ms - r0 : R;
        if (r0 + R < ms) prefetch_out(o, m0 + r0 + R, ms - r0 - R < R ? ms - r0 - R : R, q0, nq);
        const int64_t pf = r0 == 0 ? nq * o->pe : 0;
        micro_any(xb + r0 * ldxs, ldxs, p, K, c, rr, nq, pf);
        if (o->up) micro_any(xb + r0 * ldxs, ldxs, pu, K, cu, rr, nq, pf);
        epilogue(o, c, cu, m0 + r0, rr, q0, nq);
    }
}

/* Every output panel of `o` for the M rows of X [M, K]: panels split over the threads in
 * whole register blocks, X in blocks of MB rows. Returns -1 when memory ran out. */
static int run(const bf16 *X, int ldx, const Out *o, int M, int K) {
    int R, NP;
    block_shape(M, &R, &NP);
    const int mb = M < MB ? M : MB;
#if X_CONVERTED
    /* per thread: its own fp32 copy of the X block [mb, K] (converting it costs under 1/16 of
     * the FMAs, and no thread waits for another: no barrier, which on a busy machine costs
     * more than the kernel at M = 1), then two widened panels */
    const int nth = omp_get_max_threads();
    const size_t per_thread = (size_t)mb * K + (size_t)2 * K * PW;
    float *xf_all = x_buffer((size_t)nth * per_thread);
    if (!xf_all) return -1;
    const int64_t ldxs = K;
#else
    const int64_t ldxs = ldx;
#endif
#pragma omp parallel /* a team of at most omp_get_max_threads(): x_buffer's size */
    {
        int g0, g1;
        const int tid = omp_get_thread_num();
        /* whole panels (not whole register blocks): N = 576 is 36 panels, 18 a thread */
        thread_band(o->npan, 1, tid, omp_get_num_threads(), &g0, &g1);
        for (int m0 = 0; m0 < M && g0 < g1; m0 += mb) {
            const int ms = M - m0 < mb ? M - m0 : mb;
#if X_CONVERTED
            float *xb = xf_all + (size_t)tid * per_thread, *wide = xb + (size_t)mb * K;
            for (int j = 0; j < ms; j++) {
                const bf16 *x = X + (int64_t)(m0 + j) * ldx;
                float *o = xb + (int64_t)j * K;
                int k = 0;
                for (; k + VL <= K; k += VL) v_storeu(o + k, v_load_bf16(x + k));
                for (; k < K; k++) o[k] = bf2f(x[k]);
            }
#else
            float *wide = NULL;
            const bf16 *xb = X + (int64_t)m0 * ldx;
#endif
            for (int q0 = g0; q0 < g1; q0 += NP)
                panel_group(o, xb, ldxs, m0, ms, K, R, q0, g1 - q0 < NP ? g1 - q0 : NP, wide);
        }
    }
    return 0;
}

/* Y[M, N] = X[M, K] . W^T (+ bias [N]), P from genserve_panel_pack_bf16(W, P, N, K). X: row
 * stride ldx; Y: bf16 (out_f32 = 0; fp32 sum + bias rounded once, as PyTorch's bf16 linear)
 * or fp32, row stride ldy. Returns 0, or -1 (nothing written) when memory ran out. */
int genserve_panel_linear_bf16(const bf16 *X, int ldx, const bf16 *P, const bf16 *bias, void *Y,
                               int ldy, int M, int N, int K, int out_f32) {
    if (M <= 0 || N <= 0 || K <= 0) return M == 0 ? 0 : -1;
    const Out o = {P, panel_elems(K), (N + PW - 1) / PW, 0, bias, Y, ldy, N,
                   out_f32 ? OUT_F32 : OUT_BF16, NULL, 0};
    return run(X, ldx, &o, M, K);
}

/* act[M, I] = bf16(bf16(silu(g)) * u) for [g | u] = X . W^T, W the [2 I, K] gate and up
 * projections stacked (gate rows first) packed as one [2 I, K] weight: exactly
 * genserve_silu_mul_bf16 of genserve_panel_linear_bf16's bf16 output, without the [M, 2 I]
 * buffer. I % 16 == 0 (else -1: run the linear, then genserve_silu_mul_bf16). */
int genserve_panel_glu_bf16(const bf16 *X, int ldx, const bf16 *P, bf16 *act, int ldact, int M,
                            int I, int K) {
    if (I % PW || M < 0 || I <= 0 || K <= 0) return -1;
    if (M == 0) return 0;
    const int64_t pe = panel_elems(K);
    const Out o = {P, pe, I / PW, (int64_t)(I / PW) * pe, NULL, act, ldact, I, GLU, NULL, 0};
    return run(X, ldx, &o, M, K);
}

/* out[m] = argmax over columns n < n_valid of (X . W^T)[m, n] (P packed for [N, K], n_valid
 * <= N): the greedy output projection without writing the logits. The values are those
 * genserve_panel_linear_bf16 computes in fp32; the choice is genserve_argmax_f32's: the first
 * maximum, NaN never chosen, 0 for a row of -inf. With `logprob` (else NULL), also
 * logprob[m] = that maximum - logsumexp of the row's values (NaN ignored). Each panel's
 * pick is kept and the panels merged in column order after the kernel, so the result, the
 * log-probability included, is the same for any M, row position or thread count.
 * Returns 0, or -1 (nothing written) when memory ran out or the shapes are invalid. */
int genserve_panel_linear_argmax_bf16(const bf16 *X, int ldx, const bf16 *P, int M, int N, int K,
                                      int n_valid, int64_t *out, float *logprob) {
    if (M <= 0 || K <= 0 || n_valid <= 0 || n_valid > N) return -1;
    const int npan = (n_valid + PW - 1) / PW; /* panels wholly past n_valid: skipped */
    Pick *picks = malloc((size_t)M * npan * sizeof(Pick));
    if (!picks) return -1;
    const Out o = {P, panel_elems(K), npan, 0, NULL, NULL, 0, n_valid, ARGMAX, picks, logprob != NULL};
    if (run(X, ldx, &o, M, K)) {
        free(picks);
        return -1;
    }
    for (int m = 0; m < M; m++) {
        const Pick *pk = picks + (int64_t)m * npan;
        float best = -INFINITY;
        int64_t at = 0;
        for (int p = 0; p < npan; p++)
            if (pk[p].best > best) {
                best = pk[p].best;
                at = pk[p].at;
            }
        out[m] = at;
        if (logprob) { /* max - (max + log sum exp(v - max)) */
            double total = 0.0;
            for (int p = 0; p < npan; p++)
                if (pk[p].best > -INFINITY) total += (double)pk[p].sum * exp((double)pk[p].best - best);
            logprob[m] = best > -INFINITY ? (float)-log(total) : NAN;
        }
    }
    free(picks);
    return 0;
}
