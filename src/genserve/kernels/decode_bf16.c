/* Fused bf16 decode for the Llama family on CPUs with AVX512-BF16.
 *
 * A decode step is bound by reading the weights once. PyTorch spends as much time again on ~40
 * small ops per layer (norms, rotary, cache writes, masks). Here one call runs a whole decoder
 * layer for T single-token rows inside one OpenMP parallel region: every matrix is streamed once
 * in contiguous row bands per thread, multiplied with all T rows while in L1 (vdpbf16ps, fp32
 * accumulation), and the small ops run between barriers.
 *
 * Rounding follows the PyTorch bf16 path (and transformers): every op's result is rounded to
 * bf16 where PyTorch would store a bf16 tensor; accumulation is fp32.
 *
 * Built with -fopenmp against the libgomp PyTorch has already loaded (same soname), so it shares
 * PyTorch's thread pool instead of starting a second one.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "vec_math.h"

#ifdef GENSERVE_AMX
/* Built a second time with -DGENSERVE_AMX (and -mamx-*) for CPUs with AMX-BF16, once Linux has
 * granted the process AMX state (kernels/__init__.py): attention scores then come from tiles. */
#include "amx.h"

/* The B operand of tile products whose columns are 16 rows of d bf16s (NULL: a zero column):
 * pairs of dims as dwords, [d / 32 tiles][16 pairs][16 columns]. */
static void pack_pair_columns(const bf16 *const cols[16], int d, uint32_t *dst) {
    for (int c = 0; c < d / 32; c++)
        for (int kp = 0; kp < 16; kp++)
            for (int n = 0; n < 16; n++) {
                uint32_t pair = 0;
                if (cols[n]) memcpy(&pair, cols[n] + 32 * c + 2 * kp, sizeof pair);
                dst[c * 256 + kp * 16 + n] = pair;
            }
}
#endif

#define ROWS 4  /* rows of W per register block */
#define MCHUNK 4 /* rows of X per register block */
#ifndef PF_ROWS
#define PF_ROWS 8 /* software prefetch distance, in rows of W: about one block ahead */
#endif

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

static inline __m512bh load_bh(const bf16 *p, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

/* ------------------------------------------------------------------------------------ GEMM */

enum { OUT_BF16 = 0, OUT_F32 = 1, OUT_ADD_BF16 = 2 };

/* Y[m, n] (op)= X[m, :] . W[n, :] (+ bias[n]) for rows n in [n0, n1) and all M rows of X.
 * OUT_ADD_BF16: Y = bf16(Y + bf16(dot)), the residual add of the PyTorch path. */
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
                for (int j = 0; j < ms; j++) {
                    const float v = _mm512_reduce_add_ps(acc[r][j]) + b;
                    const int64_t at = (int64_t)(m0 + j) * ldy + n + r;
                    if (mode == OUT_F32) ((float *)Y)[at] = v;
                    else if (mode == OUT_BF16) ((bf16 *)Y)[at] = f2bf(v);
                    else ((bf16 *)Y)[at] = f2bf(bf2f(((bf16 *)Y)[at]) + rbf(v));
                }
            }
        }
    }
}


/* M == 1, the single-stream case: 8 rows per block, fully unrolled, so the loop is nothing but
 * loads and dot products and the weight stream runs at memory speed. */
static void gemv1_band(const bf16 *W, const bf16 *bias, const bf16 *X, void *Y, int K, int n0,
                       int n1, int mode) {
    const int full = K / 32, tail = K % 32;
    const __mmask32 tmask = (__mmask32)((1ull << tail) - 1);
    int n = n0;
    for (; n + 8 <= n1; n += 8) {
        const bf16 *w = W + (int64_t)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int c = 0; c < full; c++) {
            const int k = c * 32;
            const __m512bh xv = load_bh(X + k, ~0u);
            for (int r = 0; r < 8; r++) _mm_prefetch((const char *)(w + (PF_ROWS + r) * K + k), _MM_HINT_T0);
            a0 = _mm512_dpbf16_ps(a0, load_bh(w + k, ~0u), xv);
            a1 = _mm512_dpbf16_ps(a1, load_bh(w + K + k, ~0u), xv);
            a2 = _mm512_dpbf16_ps(a2, load_bh(w + 2 * K + k, ~0u), xv);
            a3 = _mm512_dpbf16_ps(a3, load_bh(w + 3 * K + k, ~0u), xv);
            a4 = _mm512_dpbf16_ps(a4, load_bh(w + 4 * K + k, ~0u), xv);
            a5 = _mm512_dpbf16_ps(a5, load_bh(w + 5 * K + k, ~0u), xv);
            a6 = _mm512_dpbf16_ps(a6, load_bh(w + 6 * K + k, ~0u), xv);
            a7 = _mm512_dpbf16_ps(a7, load_bh(w + 7 * K + k, ~0u), xv);
        }
        if (tail) {
            const int k = full * 32;
            const __m512bh xv = load_bh(X + k, tmask);
            a0 = _mm512_dpbf16_ps(a0, load_bh(w + k, tmask), xv);
            a1 = _mm512_dpbf16_ps(a1, load_bh(w + K + k, tmask), xv);
            a2 = _mm512_dpbf16_ps(a2, load_bh(w + 2 * K + k, tmask), xv);
            a3 = _mm512_dpbf16_ps(a3, load_bh(w + 3 * K + k, tmask), xv);
            a4 = _mm512_dpbf16_ps(a4, load_bh(w + 4 * K + k, tmask), xv);
            a5 = _mm512_dpbf16_ps(a5, load_bh(w + 5 * K + k, tmask), xv);
            a6 = _mm512_dpbf16_ps(a6, load_bh(w + 6 * K + k, tmask), xv);
            a7 = _mm512_dpbf16_ps(a7, load_bh(w + 7 * K + k, tmask), xv);
        }
        const float v[8] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),
                            _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3),
                            _mm512_reduce_add_ps(a4), _mm512_reduce_add_ps(a5),
                            _mm512_reduce_add_ps(a6), _mm512_reduce_add_ps(a7)};
        for (int r = 0; r < 8; r++) {
            const float o = v[r] + (bias ? bf2f(bias[n + r]) : 0.0f);
            if (mode == OUT_F32) ((float *)Y)[n + r] = o;
            else if (mode == OUT_BF16) ((bf16 *)Y)[n + r] = f2bf(o);
            else ((bf16 *)Y)[n + r] = f2bf(bf2f(((bf16 *)Y)[n + r]) + rbf(o));
        }
    }
    if (n < n1) gemm_band(W, bias, X, 0, Y, 0, 1, K, n, n1, mode);
}

/* Inside a parallel region: split N rows into ROWS-aligned bands, one per thread (no barrier). */
static void gemm_omp(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy,
                     int M, int N, int K, int mode) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int blocks = (N + ROWS - 1) / ROWS;
    const int per = (blocks + nt - 1) / nt;
    const int b0 = t * per, b1 = (b0 + per) < blocks ? (b0 + per) : blocks;
    if (b0 >= b1) return;
    const int n1 = b1 * ROWS < N ? b1 * ROWS : N;
    if (M == 1) gemv1_band(W, bias, X, Y, K, b0 * ROWS, n1, mode);
    else gemm_band(W, bias, X, ldx, Y, ldy, M, K, b0 * ROWS, n1, mode);
}

/* Y = X W^T (+ bias): X [M, K] bf16 (row stride ldx), W [N, K] bf16, Y fp32 or bf16 [M, ldy]. */
void genserve_gemm_bf16(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy,
                        int M, int N, int K, int out_f32) {
#pragma omp parallel
    gemm_omp(W, bias, X, ldx, Y, ldy, M, N, K, out_f32 ? OUT_F32 : OUT_BF16);
}

/* -------------------------------------------------------------------------------- small ops */

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)), the transformers RMSNorm in bf16 */
static void rmsnorm_row(const bf16 *x, const bf16 *w, bf16 *out, int n, float eps) {
    if (n % 16 == 0) { /* the same rounding, 16 lanes at a time (another order of the fp32 sum) */
        __m512 ss = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            const __m512 v = load_bf16x16(x + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps));
        for (int i = 0; i < n; i += 16) {
            const __m512 r = round_bf16x16(_mm512_mul_ps(load_bf16x16(x + i), inv));
            _mm256_storeu_si256((__m256i *)(out + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16x16(w + i), r)));
        }
        return;
    }
    float ss = 0.0f;
    for (int i = 0; i < n; i++) {
        const float v = bf2f(x[i]);
        ss += v * v;
    }
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = f2bf(bf2f(w[i]) * rbf(bf2f(x[i]) * inv));
}

/* rotate-half rotary in fp32, rounded once: x: [D] in place; cs: [D] = cos(half) | sin(half) */
static void rope_head(bf16 *x, const float *cs, int d) {
    const int h = d / 2;
    int i = 0;
    for (; i + 16 <= h; i += 16) {
        const __m512 x1 = load_bf16x16(x + i), x2 = load_bf16x16(x + i + h);
        const __m512 c = _mm512_loadu_ps(cs + i), sn = _mm512_loadu_ps(cs + h + i);
        _mm256_storeu_si256((__m256i *)(x + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, sn))));
        _mm256_storeu_si256((__m256i *)(x + i + h),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, sn))));
    }
    for (; i < h; i++) {
        const float x1 = bf2f(x[i]), x2 = bf2f(x[i + h]);
        const float c = cs[i], s = cs[h + i];
        x[i] = f2bf(x1 * c - x2 * s);
        x[i + h] = f2bf(x2 * c + x1 * s);
    }
}

static float dot_bf16(const bf16 *a, const bf16 *b, int d) {
    __m512 acc = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= d; k += 32) acc = _mm512_dpbf16_ps(acc, load_bh(a + k, ~0u), load_bh(b + k, ~0u));
    if (k < d) {
        const __mmask32 m = (__mmask32)((1ull << (d - k)) - 1);
        acc = _mm512_dpbf16_ps(acc, load_bh(a + k, m), load_bh(b + k, m));
    }
    return _mm512_reduce_add_ps(acc);
}

typedef struct {
    const bf16 *k_cache, *v_cache; /* [slots, KVH, D] */
    const int64_t *block_tables;   /* [T, max_blocks] */
    const int64_t *context_lens;   /* [T] */
    int max_blocks, block_size, num_heads, num_kv_heads, head_dim;
    float scale;
} AttnArgs;

/* one (row, head): softmax(q . K^T * scale) V over the row's context, fp32, rounded once */
static void attend(const AttnArgs *a, const bf16 *q, bf16 *out, float *scores, int t, int h) {
    const int kvh = h / (a->num_heads / a->num_kv_heads), d = a->head_dim, bs = a->block_size;
    const int64_t len = a->context_lens[t];
    const int64_t *table = a->block_tables + (int64_t)t * a->max_blocks;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
        const int64_t slot = table[j / bs] * bs + j % bs;
        const float s = dot_bf16(q, a->k_cache + (slot * a->num_kv_heads + kvh) * d, d) * a->scale;
        scores[j] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < len; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float acc[256];
    for (int i = 0; i < d; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < len; j++) {
        const int64_t slot = table[j / bs] * bs + j % bs;
        const bf16 *v = a->v_cache + (slot * a->num_kv_heads + kvh) * d;
        const float p = scores[j];
        for (int i = 0; i < d; i++) acc[i] += p * bf2f(v[i]);
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < d; i++) out[i] = f2bf(acc[i] * inv);
}

/* Item i of T * (H + KVH) over a row-major [T, ld] qkv buffer: q/k norm (Qwen3), rotary, and
 * for a K head its K and V written to the paged cache at the row's slot. */
static void qkv_head_post(bf16 *qkv, int64_t ld, int i, int H, int KVH, int D, const float *cos_sin,
                          const bf16 *q_norm, const bf16 *k_norm, float eps, bf16 *k_cache,
                          bf16 *v_cache, const int64_t *slot_mapping) {
    const int t = i / (H + KVH), hd = i % (H + KVH);
    bf16 *head = qkv + (int64_t)t * ld + (int64_t)hd * D;
    const bf16 *norm = hd < H ? q_norm : k_norm;
    if (norm) rmsnorm_row(head, norm, head, D, eps);
    rope_head(head, cos_sin + (int64_t)t * D, D);
    if (hd >= H) {
        const int64_t slot = slot_mapping[t];
        const int kv = hd - H;
        memcpy(k_cache + (slot * KVH + kv) * D, head, D * sizeof(bf16));
        memcpy(v_cache + (slot * KVH + kv) * D, head + (int64_t)KVH * D, D * sizeof(bf16));
    }
}

/* ----------------------------------------------------------------------------- the layer */

typedef struct {
    const bf16 *ln1, *qkv, *qkv_bias, *o, *ln2, *gate_up, *down, *q_norm, *k_norm;
    int hidden, num_heads, num_kv_heads, head_dim, inter;
    float eps;
} LayerWeights;

typedef struct {
    bf16 *h;      /* [T, hidden] normed input */
    bf16 *qkv;    /* [T, (H + 2 KVH) D] */
    bf16 *attn;   /* [T, H D] */
    bf16 *gu;     /* [T, 2 I] */
    bf16 *act;    /* [T, I] */
    float *scores; /* [T * H, max_context] */
    int64_t max_context;
} Scratch;

void genserve_decode_layer_bf16(const LayerWeights *w, bf16 *x, int T, const float *cos_sin,
                                bf16 *k_cache, bf16 *v_cache, const int64_t *slot_mapping,
                                const int64_t *block_tables, int max_blocks,
                                const int64_t *context_lens, int block_size, const Scratch *s) {
    const int H = w->num_heads, KVH = w->num_kv_heads, D = w->head_dim, hid = w->hidden;
    const int qkv_n = (H + 2 * KVH) * D, I = w->inter;
    const AttnArgs aa = {k_cache, v_cache, block_tables, context_lens, max_blocks, block_size,
                         H, KVH, D, 1.0f / sqrtf((float)D)};
#pragma omp parallel
    {
#pragma omp for
        for (int t = 0; t < T; t++) rmsnorm_row(x + (int64_t)t * hid, w->ln1, s->h + (int64_t)t * hid, hid, w->eps);
        gemm_omp(w->qkv, w->qkv_bias, s->h, hid, s->qkv, qkv_n, T, qkv_n, hid, OUT_BF16);
#pragma omp barrier
        /* q/k norm (Qwen3), rotary, then K/V into the paged cache */
#pragma omp for
        for (int i = 0; i < T * (H + KVH); i++)
            qkv_head_post(s->qkv, qkv_n, i, H, KVH, D, cos_sin, w->q_norm, w->k_norm, w->eps,
                          k_cache, v_cache, slot_mapping);
#pragma omp for
        for (int i = 0; i < T * H; i++) {
            const int t = i / H, h = i % H;
            attend(&aa, s->qkv + (int64_t)t * qkv_n + (int64_t)h * D, s->attn + (int64_t)t * H * D + (int64_t)h * D,
                   s->scores + (int64_t)i * s->max_context, t, h);
        }
        gemm_omp(w->o, NULL, s->attn, H * D, x, hid, T, hid, H * D, OUT_ADD_BF16);
#pragma omp barrier
#pragma omp for
        for (int t = 0; t < T; t++) rmsnorm_row(x + (int64_t)t * hid, w->ln2, s->h + (int64_t)t * hid, hid, w->eps);
        gemm_omp(w->gate_up, NULL, s->h, hid, s->gu, 2 * I, T, 2 * I, hid, OUT_BF16);
#pragma omp barrier
#pragma omp for
        for (int64_t i = 0; i < (int64_t)T * I; i++) {
            const int64_t t = i / I, j = i % I;
            const float g = bf2f(s->gu[t * 2 * I + j]), u = bf2f(s->gu[t * 2 * I + I + j]);
            s->act[i] = f2bf(rbf(g / (1.0f + expf(-g))) * u);
        }
        gemm_omp(w->down, NULL, s->act, I, x, hid, T, hid, I, OUT_ADD_BF16);
    }
}

/* ------------------------------------------------------------ batched paged decode attention */

/* n floats for the calling OpenMP thread, reused every step */
static float *thread_buffer(size_t n) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    return (float *)grow_buffer(&buf, &cap, n * sizeof(float));
}

/* The G query heads that share KV head `kvh` of row t: K and V are read once for the group.
 * Two passes (scores, then softmax(scores) V) in fp32, output rounded once to bf16. */
static void attend_group(const AttnArgs *a, const bf16 *q, bf16 *out, float *scores, float *acc,
                         int t, int kvh, int G) {
    const int d = a->head_dim, bs = a->block_size, KVH = a->num_kv_heads;
    const int64_t len = a->context_lens[t];
    const int64_t *table = a->block_tables + (int64_t)t * a->max_blocks;
    float mx[64];
    for (int g = 0; g < G; g++) mx[g] = -INFINITY;
    for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const int64_t base = table[j0 / bs] * bs;
        const int64_t n = len - j0 < bs ? len - j0 : bs;
        for (int64_t jj = 0; jj < n; jj++) {
            const bf16 *k = a->k_cache + ((base + jj) * KVH + kvh) * d;
            for (int g = 0; g < G; g++) {
                const float s = dot_bf16(q + (int64_t)g * d, k, d) * a->scale;
                scores[(int64_t)g * len + j0 + jj] = s;
                mx[g] = s > mx[g] ? s : mx[g];
            }
        }
    }
    float inv[64];
    for (int g = 0; g < G; g++) {
        float *sg = scores + (int64_t)g * len, sum = 0.0f;
        for (int64_t j = 0; j < len; j++) {
            sg[j] = expf(sg[j] - mx[g]);
            sum += sg[j];
        }
        inv[g] = 1.0f / sum;
    }
    for (int i = 0; i < G * d; i++) acc[i] = 0.0f;
    float vf[256];
    for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const int64_t base = table[j0 / bs] * bs;
        const int64_t n = len - j0 < bs ? len - j0 : bs;
        for (int64_t jj = 0; jj < n; jj++) {
            const bf16 *v = a->v_cache + ((base + jj) * KVH + kvh) * d;
            for (int i = 0; i < d; i++) vf[i] = bf2f(v[i]);
            for (int g = 0; g < G; g++) {
                const float p = scores[(int64_t)g * len + j0 + jj];
                float *ag = acc + (int64_t)g * d;
                for (int i = 0; i < d; i++) ag[i] += p * vf[i];
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < d; i++) out[(int64_t)g * d + i] = f2bf(acc[(int64_t)g * d + i] * inv[g]);
}

/* Horizontal sums of 16 vectors at once: out[i] = sum of v[i]'s lanes (a transpose-add tree:
 * 15 shuffles and adds per level instead of a full reduction per vector). */
static inline __m512 reduce16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline void prefetch_row(const bf16 *row, int d) { /* d bf16s into L1 */
    for (int off = 0; off < d * 2; off += 64) _mm_prefetch((const char *)row + off, _MM_HINT_T0);
}

/* acc[g * nv + c] += sum_{j0 <= j < j1} scores[g, j] * V[j, 16c : 16c + 16] in fp32, for one
 * KV head (`v_cache` points at its row of the first slot). `pv_fixed`, inlined with constant
 * G and nv, keeps acc in registers over the keys; the generic loop keeps it in memory. */
static inline __attribute__((always_inline)) void pv_fixed(const bf16 *v_cache, const int64_t *rows,
                                                           const float *scores, int64_t lenp,
                                                           int64_t j0, int64_t j1, const int G,
                                                           const int nv, __m512 *out) {
    __m512 acc[32];
    for (int i = 0; i < G * nv; i++) acc[i] = out[i];
    for (int64_t j = j0; j < j1; j++) {
        const bf16 *v = v_cache + rows[j];
        for (int c = 0; c < nv; c++) {
            const __m512 vf = load_bf16x16(v + 16 * c);
            for (int g = 0; g < G; g++)
                acc[g * nv + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(int64_t)g * lenp + j]), vf,
                                                  acc[g * nv + c]);
        }
    }
    for (int i = 0; i < G * nv; i++) out[i] = acc[i];
}

static void pv(const bf16 *v_cache, const int64_t *rows, const float *scores, int64_t lenp,
               int64_t j0, int64_t j1, int G, int nv, __m512 *acc) {
#define PV_CASE(g, n) \
    if (G == g && nv == n) return pv_fixed(v_cache, rows, scores, lenp, j0, j1, g, n, acc);
    PV_CASE(1, 4) PV_CASE(2, 4) PV_CASE(3, 4) PV_CASE(4, 4) PV_CASE(5, 4) PV_CASE(6, 4)
    PV_CASE(7, 4) PV_CASE(8, 4) PV_CASE(1, 8) PV_CASE(2, 8) PV_CASE(3, 8) PV_CASE(4, 8)
#undef PV_CASE
    for (int64_t j = j0; j < j1; j++) {
        const bf16 *v = v_cache + rows[j];
        __m512 vf[16];
        for (int c = 0; c < nv; c++) vf[c] = load_bf16x16(v + 16 * c);
        for (int g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(scores[(int64_t)g * lenp + j]);
            for (int c = 0; c < nv; c++) acc[g * nv + c] = _mm512_fmadd_ps(p, vf[c], acc[g * nv + c]);
        }
    }
}

/* attend_group for head_dim a multiple of 32 (up to 256), vectorised, for the `nkv` KV heads
 * from `kvh0` (G query heads each, nkv * G <= 64; q and out point at head kvh0 * G): scores
 * for 16 keys at a time, softmax with exp512, V accumulated in fp32 vectors. `scores` holds
 * nkv * G rows of `lenp` (len rounded up to 16) floats. Same math as attend_group (fp32, one
 * rounding). With every KV head of a row at once (nkv = KVH), each 16 keys' K rows are read
 * as the contiguous run they are in the cache, which the hardware prefetchers stream at about
 * twice the rate of one head's strided rows. */
static void attend_heads_avx512(const AttnArgs *a, const bf16 *q, bf16 *out, float *scores,
                                int64_t *rows, int64_t lenp, int t, int kvh0, int nkv, int G) {
    const int d = a->head_dim, bs = a->block_size, KVH = a->num_kv_heads;
    const int nd = d / 32, nv = d / 16, nh = nkv * G;
    const int64_t len = a->context_lens[t];
    const int64_t *table = a->block_tables + (int64_t)t * a->max_blocks;
    /* element offset of each key's first head row in the caches, block by block */
    for (int64_t j = 0, b = 0; j < len; b++)
        for (int64_t r = 0, base = table[b] * bs; r < bs && j < len; r++, j++)
            rows[j] = (base + r) * KVH * d;
    const __m512 scale = _mm512_set1_ps(a->scale);
    __m512 mx[64];
    for (int h = 0; h < nh; h++) mx[h] = _mm512_set1_ps(-INFINITY);
#ifdef GENSERVE_AMX
    /* S^T = K Q^T in tiles: 16 keys of a block (rows of the cache, one KV head, loaded in
     * place at the slot stride) times the G query heads of that KV head, 32 dims per multiply;
     * fp32 accumulation of bf16 products as vdpbf16ps. Needs whole 16-key runs in one block. */
    if (bs % 16 == 0 && nd <= 8) {
        uint32_t qt[8 * 256] __attribute__((aligned(64)));
        float c[256] __attribute__((aligned(64)));
        const __m512i col = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                              192, 208, 224, 240);
        for (int kv = 0; kv < nkv; kv++) {
            const bf16 *heads[16] = {NULL}; /* Q^T: this KV head's query heads as columns */
            for (int g = 0; g < G; g++) heads[g] = q + (int64_t)(kv * G + g) * d;
            pack_pair_columns(heads, d, qt);
            for (int64_t j0 = 0; j0 < len; j0 += 16) {
                const int n = len - j0 < 16 ? (int)(len - j0) : 16;
                const __mmask16 m = (__mmask16)((1u << n) - 1);
                if (kv == 0)
                    for (int64_t j = j0 + 16; j < j0 + 32 && j < len; j++)
                        prefetch_row(a->k_cache + rows[j] + (int64_t)kvh0 * d, nkv * d);
                /* the rows past `len` in the last block are read and masked out below */
                const bf16 *k0 = a->k_cache + rows[j0] + (int64_t)(kvh0 + kv) * d;
                _tile_zero(0);
                for (int cb = 0; cb < nd; cb++) {
                    _tile_loadd(1, k0 + 32 * cb, KVH * d * 2);
                    _tile_loadd(2, qt + cb * 256, 64);
                    _tile_dpbf16ps(0, 1, 2);
                }
                _tile_stored(0, c, 64); /* c[key][head] */
                for (int g = 0; g < G; g++) {
                    const int h = kv * G + g;
                    const __m512 sc = _mm512_mask_mov_ps(
                        _mm512_set1_ps(-INFINITY), m,
                        _mm512_mul_ps(_mm512_i32gather_ps(col, c + g, 4), scale));
                    _mm512_storeu_ps(scores + (int64_t)h * lenp + j0, sc);
                    mx[h] = _mm512_max_ps(mx[h], sc);
                }
            }
        }
    } else
#endif
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
        const int n = len - j0 < 16 ? (int)(len - j0) : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        /* the next chunk's keys may be in other blocks: fetch them while this one computes */
        for (int64_t j = j0 + 16; j < j0 + 32 && j < len; j++)
            prefetch_row(a->k_cache + rows[j] + (int64_t)kvh0 * d, nkv * d);
        for (int kv = 0; kv < nkv; kv++) {
            const bf16 *kp[16];
            for (int jj = 0; jj < 16; jj++)
                kp[jj] = a->k_cache + rows[j0 + (jj < n ? jj : 0)] + (int64_t)(kvh0 + kv) * d;
            for (int g = 0; g < G; g++) {
                const int h = kv * G + g;
                const bf16 *qg = q + (int64_t)h * d;
                __m512 v[16];
                for (int jj = 0; jj < 16; jj++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int c = 0; c < nd; c++)
                        acc = _mm512_dpbf16_ps(acc, load_bh(qg + 32 * c, ~0u), load_bh(kp[jj] + 32 * c, ~0u));
                    v[jj] = acc;
                }
                const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m,
                                                     _mm512_mul_ps(reduce16(v), scale));
                _mm512_storeu_ps(scores + (int64_t)h * lenp + j0, sc);
                mx[h] = _mm512_max_ps(mx[h], sc);
            }
        }
    }
    float inv[64];
    for (int h = 0; h < nh; h++) {
        const __m512 hmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx[h]));
        float *sh = scores + (int64_t)h * lenp;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < len; j0 += 16) {
            const int n = len - j0 < 16 ? (int)(len - j0) : 16;
            const __mmask16 m = (__mmask16)((1u << n) - 1);
            const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_loadu_ps(sh + j0), hmax)));
            _mm512_storeu_ps(sh + j0, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[h] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    /* P.V 16 keys at a time, every KV head of those keys before the next 16: the V rows are
     * read in cache order, as the K rows were */
    __m512 acc[256];
    for (int i = 0; i < nh * nv; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
        const int64_t j1 = len - j0 < 16 ? len : j0 + 16;
        for (int64_t j = j1; j < j1 + 16 && j < len; j++)
            prefetch_row(a->v_cache + rows[j] + (int64_t)kvh0 * d, nkv * d);
        for (int kv = 0; kv < nkv; kv++)
            pv(a->v_cache + (int64_t)(kvh0 + kv) * d, rows, scores + (int64_t)kv * G * lenp, lenp, j0,
               j1, G, nv, acc + kv * G * nv);
    }
    for (int h = 0; h < nh; h++) {
        const __m512 sv = _mm512_set1_ps(inv[h]);
        for (int c = 0; c < nv; c++)
            _mm256_storeu_si256((__m256i *)(out + (int64_t)h * d + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h * nv + c], sv)));
    }
}

/* q, out: rows of H * D bf16 at strides ldq, ldo (elements); caches [slots, KVH, D]; returns 0,
 * or -1 when a thread buffer could not be allocated or the head layout is unsupported (the
 * caller falls back). */
int genserve_paged_decode_attention_bf16(const bf16 *q, int64_t ldq, bf16 *out, int64_t ldo,
                                         const bf16 *k_cache, const bf16 *v_cache,
                                         const int64_t *block_tables, int max_blocks,
                                         const int64_t *context_lens, int64_t max_context, int T,
                                         int H, int KVH, int D, int block_size, float scale) {
    const int G = H / KVH;
    if (G > 64 || D > 256 || H % KVH) return -1;
    const AttnArgs aa = {k_cache, v_cache, block_tables, context_lens, max_blocks, block_size,
                         H, KVH, D, scale};
    int failed = 0;
    const int vec = D % 32 == 0 && G <= 16;
    /* a row's KV heads in one work item once there are rows enough to share out */
    const int per_row = vec && H * (D / 16) <= 256 && T >= 4 * omp_get_max_threads();
#pragma omp parallel
    {
        const int64_t lenp = (max_context + 15) / 16 * 16;
        /* scores [heads, lenp] floats, then the key rows [lenp] int64 (or the generic path's acc) */
        float *buf = thread_buffer((size_t)(per_row ? H : G) * lenp + 2 * (size_t)lenp + (size_t)G * D);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        int64_t *rows = (int64_t *)(buf + (size_t)(per_row ? H : G) * lenp);
#ifdef GENSERVE_AMX
        amx_tiles_16x64();
#endif
#pragma omp for schedule(dynamic)
        for (int i = 0; i < (per_row ? T : T * KVH); i++) {
            if (!buf) continue;
            const int t = per_row ? i : i % T, kvh = per_row ? 0 : i / T;
            const int64_t head = (int64_t)kvh * G * D;
            const bf16 *qt = q + t * ldq + head;
            bf16 *ot = out + t * ldo + head;
            if (per_row)
                attend_heads_avx512(&aa, qt, ot, buf, rows, lenp, t, 0, KVH, G);
            else if (vec)
                attend_heads_avx512(&aa, qt, ot, buf, rows, lenp, t, kvh, 1, G);
            else
                attend_group(&aa, qt, ot, buf + (size_t)G * D, buf, t, kvh, G);
        }
#ifdef GENSERVE_AMX
        _tile_release();
#endif
    }
    return failed ? -1 : 0;
}

#ifdef GENSERVE_AMX
/* ------------------------------------------------------------ prefill attention in AMX tiles
 * Causal attention of S prefill chunks (rows row_starts[s] .. + num_tokens[s] of the qkv buffer,
 * whose K/V are already in the cache) over their whole context (cached prefix + the chunk),
 * read from the paged cache. Per (chunk, KV head): K^T and V are packed once into tile layout
 * (pairs interleaved), then each of the G query heads takes 16 queries at a time:
 * S = Q K^T in tiles (fp32), a row softmax in fp32, P rounded to bf16 (as PyTorch's flash
 * attention rounds it before P.V), O = P V in tiles (fp32), scaled by 1/sum, rounded once. */
static void prefill_item(const bf16 *qkv, int64_t ld, bf16 *out, int64_t ldo, const bf16 *k_cache,
                         const bf16 *v_cache, const int64_t *table, int64_t row0, int64_t n,
                         int64_t ctx, int kvh, int H, int KVH, int D, int bs, float scale,
                         float *buf) {
    const int G = H / KVH, nd = D / 32, nv = D / 16;
    const int64_t start = ctx - n, c32 = (ctx + 31) / 32 * 32;
    uint32_t *kt = (uint32_t *)buf;                   /* [c32 / 16][nd][16 dim pairs][16 keys] */
    bf16 *vv = (bf16 *)(kt + (size_t)c32 * D / 2);    /* [c32 / 32][nv][16 key pairs][16][2] */
    float *sbuf = (float *)(vv + (size_t)c32 * D);    /* [16 queries][c32] */
    bf16 *pbuf = (bf16 *)(sbuf + 16 * (size_t)c32);   /* [16 queries][c32] */
    bf16 *qpad = pbuf + 16 * (size_t)c32;             /* [16][D] */
    float *obuf = (float *)(qpad + 16 * (size_t)D);   /* [16][64] */
    const __m512i ilv = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t j0 = 0; j0 < c32; j0 += 16) { /* K^T: 16 keys as columns */
        const bf16 *keys[16];
        for (int n = 0; n < 16; n++) {
            const int64_t j = j0 + n;
            keys[n] = j < ctx ? k_cache + ((table[j / bs] * bs + j % bs) * KVH + kvh) * D : NULL;
        }
        pack_pair_columns(keys, D, kt + (j0 / 16) * nd * 256);
    }
    for (int64_t j = 0; j < c32; j += 2) { /* V: keys j, j + 1 interleaved, 16 dims a tile */
        const bf16 *r0 = j < ctx ? v_cache + ((table[j / bs] * bs + j % bs) * KVH + kvh) * D : NULL;
        const bf16 *r1 = j + 1 < ctx ? v_cache + ((table[(j + 1) / bs] * bs + (j + 1) % bs) * KVH + kvh) * D : NULL;
        for (int cb = 0; cb < nv; cb++) {
            const __m256i x0 = r0 ? _mm256_loadu_si256((const __m256i *)(r0 + 16 * cb)) : _mm256_setzero_si256();
            const __m256i x1 = r1 ? _mm256_loadu_si256((const __m256i *)(r1 + 16 * cb)) : _mm256_setzero_si256();
            _mm512_storeu_si512(vv + ((j / 32) * nv + cb) * 512 + (j % 32 / 2) * 32,
                                _mm512_permutexvar_epi16(ilv, _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1)));
        }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        for (int64_t qb = 0; qb < n; qb += 16) {
            const int rq = n - qb < 16 ? (int)(n - qb) : 16;
            const bf16 *qs = qkv + (row0 + qb) * ld + (int64_t)h * D;
            int64_t qstride = ld * 2;
            if (rq < 16) { /* the tile reads 16 rows: a zero-padded copy */
                memset(qpad, 0, (size_t)16 * D * sizeof(bf16));
                for (int r = 0; r < rq; r++) memcpy(qpad + (int64_t)r * D, qs + r * ld, (size_t)D * sizeof(bf16));
                qs = qpad;
                qstride = (int64_t)D * 2;
            }
            const int64_t kend = start + qb + rq, k32 = (kend + 31) / 32 * 32;
            for (int64_t kc = 0; kc < k32; kc += 16) {
                _tile_zero(0);
                for (int c = 0; c < nd; c++) {
                    _tile_loadd(1, qs + 32 * c, qstride);
                    _tile_loadd(2, kt + ((kc / 16) * nd + c) * 256, 64);
                    _tile_dpbf16ps(0, 1, 2);
                }
                _tile_stored(0, sbuf + kc, c32 * 4);
            }
            float inv[16];
            for (int r = 0; r < 16; r++) {
                float *sr = sbuf + (int64_t)r * c32;
                bf16 *pr = pbuf + (int64_t)r * c32;
                const int64_t len = r < rq ? start + qb + r + 1 : 0; /* keys this query sees */
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t j0 = 0; j0 < len; j0 += 16) {
                    const __mmask16 m = len - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - j0)) - 1);
                    mx = _mm512_max_ps(mx, _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), m, _mm512_loadu_ps(sr + j0), vscale));
                }
                const __m512 rmax = _mm512_set1_ps(len ? _mm512_reduce_max_ps(mx) : 0.0f);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j0 = 0; j0 < k32; j0 += 16) {
                    const int64_t left = len - j0;
                    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                    const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(sr + j0), vscale), rmax)));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i *)(pr + j0), (__m256i)_mm512_cvtneps_pbh(e));
                }
                inv[r] = len ? 1.0f / _mm512_reduce_add_ps(sum) : 0.0f;
            }
            for (int dg = 0; dg < nv; dg += 4) {
                const int nt = nv - dg < 4 ? nv - dg : 4;
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int64_t kc = 0; kc < k32; kc += 32) {
                    const bf16 *vt = vv + ((kc / 32) * nv + dg) * 512;
                    _tile_loadd(0, pbuf + kc, c32 * 2);
                    _tile_loadd(1, vt, 64);
                    _tile_dpbf16ps(4, 0, 1);
                    if (nt > 1) {
                        _tile_loadd(1, vt + 512, 64);
                        _tile_dpbf16ps(5, 0, 1);
                    }
                    if (nt > 2) {
                        _tile_loadd(1, vt + 1024, 64);
                        _tile_dpbf16ps(6, 0, 1);
                    }
                    if (nt > 3) {
                        _tile_loadd(1, vt + 1536, 64);
                        _tile_dpbf16ps(7, 0, 1);
                    }
                }
                _tile_stored(4, obuf, 256);
                _tile_stored(5, obuf + 16, 256);
                _tile_stored(6, obuf + 32, 256);
                _tile_stored(7, obuf + 48, 256);
                for (int r = 0; r < rq; r++) {
                    const __m512 sv = _mm512_set1_ps(inv[r]);
                    bf16 *o = out + (row0 + qb + r) * ldo + (int64_t)h * D + 16 * dg;
                    for (int t = 0; t < nt; t++)
                        _mm256_storeu_si256((__m256i *)(o + 16 * t),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(obuf + r * 64 + 16 * t), sv)));
                }
            }
        }
    }
}

/* qkv rows of (H + 2 KVH) D at stride ld; out rows of H D at stride ldo; tables [S, max_blocks].
 * Returns 0, or -1 (nothing written) for an unsupported head size or when memory ran out. */
int genserve_prefill_attention_amx(const bf16 *qkv, int64_t ld, bf16 *out, int64_t ldo,
                                   const bf16 *k_cache, const bf16 *v_cache,
                                   const int64_t *block_tables, int max_blocks,
                                   const int64_t *row_starts, const int64_t *num_tokens,
                                   const int64_t *context_lens, int S, int H, int KVH, int D,
                                   int block_size, float scale) {
    if (D % 32 || D > 256 || H % KVH) return -1;
    int64_t max_ctx = 0;
    for (int s = 0; s < S; s++) max_ctx = context_lens[s] > max_ctx ? context_lens[s] : max_ctx;
    const size_t c32 = (size_t)(max_ctx + 31) / 32 * 32;
    /* floats: K^T, V, scores, P, the Q copy, O */
    const size_t need = c32 * D / 2 + c32 * D / 2 + 16 * c32 + 8 * c32 + 8 * (size_t)D + 16 * 64 + 64;
    int failed = 0;
#pragma omp parallel
    {
        float *buf = thread_buffer(need);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            amx_tiles_16x64();
#pragma omp for schedule(dynamic)
            for (int i = 0; i < S * KVH; i++)
                prefill_item(qkv, ld, out, ldo, k_cache, v_cache,
                             block_tables + (int64_t)(i / KVH) * max_blocks, row_starts[i / KVH],
                             num_tokens[i / KVH], context_lens[i / KVH], i % KVH, H, KVH, D,
                             block_size, scale, buf);
            _tile_release();
        }
    }
    return failed ? -1 : 0;
}
#endif

/* ------------------------------------------- the small ops of a batched decode layer, fused
 * For steps of more rows than the fused layer takes: the matmuls run in PyTorch (oneDNN,
 * prepacked), everything between them here, one parallel region each, rounding as PyTorch. */

/* x[t] = bf16(x[t] + delta[t]) when delta is given (the residual add), then out[t] = rmsnorm(x[t]) */
void genserve_add_rmsnorm_bf16(bf16 *x, const bf16 *delta, const bf16 *w, bf16 *out, int T,
                               int hid, float eps) {
#pragma omp parallel for
    for (int t = 0; t < T; t++) {
        bf16 *xr = x + (int64_t)t * hid;
        if (delta) {
            const bf16 *dr = delta + (int64_t)t * hid;
            int i = 0;
            for (; i + 16 <= hid; i += 16)
                _mm256_storeu_si256((__m256i *)(xr + i),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(load_bf16x16(xr + i), load_bf16x16(dr + i))));
            for (; i < hid; i++) xr[i] = f2bf(bf2f(xr[i]) + bf2f(dr[i]));
        }
        rmsnorm_row(xr, w, out + (int64_t)t * hid, hid, eps);
    }
}

/* q/k norm, rotary and the K/V cache write for T rows of a [T, (H + 2 KVH) D] qkv buffer */
void genserve_qkv_post_bf16(bf16 *qkv, int T, int H, int KVH, int D, const float *cos_sin,
                            const bf16 *q_norm, const bf16 *k_norm, float eps, bf16 *k_cache,
                            bf16 *v_cache, const int64_t *slot_mapping) {
    const int64_t ld = (int64_t)(H + 2 * KVH) * D;
#pragma omp parallel for
    for (int i = 0; i < T * (H + KVH); i++)
        qkv_head_post(qkv, ld, i, H, KVH, D, cos_sin, q_norm, k_norm, eps, k_cache, v_cache,
                      slot_mapping);
}

/* act[t, j] = bf16(bf16(silu(g)) * u) over a [T, 2 I] gate|up buffer, as silu_and_mul */
void genserve_silu_mul_bf16(const bf16 *gu, bf16 *act, int T, int I) {
#pragma omp parallel for
    for (int t = 0; t < T; t++) {
        const bf16 *g = gu + (int64_t)t * 2 * I, *u = g + I;
        bf16 *a = act + (int64_t)t * I;
        int j = 0;
        for (; j + 16 <= I; j += 16) {
            const __m512 silu = silu_bf16x16(load_bf16x16(g + j));
            _mm256_storeu_si256((__m256i *)(a + j),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, load_bf16x16(u + j))));
        }
        for (; j < I; j++) {
            const float gf = bf2f(g[j]);
            a[j] = f2bf(rbf(gf / (1.0f + expf(-gf))) * bf2f(u[j]));
        }
    }
}

/* ------------------------------------------------ a batched decode step, every layer in one call
 * The layer loop of FusedDecode.forward_mixed for pure-decode steps whose linears are all packed
 * for `linear` (amx_linear.c's genserve_amx_linear_bf16, passed as a pointer: it lives in the
 * AMX library): the same calls in the same order, without going back to Python between them. */
typedef int (*LinearFn)(const bf16 *X, int ldx, const bf16 *P, const bf16 *bias, void *Y,
                        int ldy, int M, int N, int K, int out_f32);
/* amx_linear.c's genserve_amx_glu_bf16: gate_up linear and silu_and_mul in one pass */
typedef int (*GluFn)(const bf16 *X, int ldx, const bf16 *P, bf16 *act, int ldact, int M, int I,
                     int K);

typedef struct {
    const bf16 *qkv, *o, *gate_up, *down; /* packed for `linear` */
    bf16 *k_cache, *v_cache;
} StackLayer;

typedef struct {
    bf16 *h;    /* [T, hidden] normed input */
    bf16 *qkv;  /* [T, (H + 2 KVH) D] */
    bf16 *attn; /* [T, H D] */
    bf16 *o;    /* [T, hidden] */
    bf16 *gu;   /* [T, 2 I] */
    bf16 *act;  /* [T, I] */
    bf16 *down; /* [T, hidden] */
} StackScratch;

/* x: [T, hidden] embeddings, the residual stream (updated in place); out: the final-normed
 * hidden states. `glu` (or NULL: linear, then genserve_silu_mul_bf16 through s->gu) runs the
 * MLP's first half. Returns 0, or -1 when a kernel could not get memory (the step is lost). */
int genserve_decode_stack_bf16(LinearFn linear, GluFn glu, const LayerWeights *w, const StackLayer *layers,
                               int num_layers, bf16 *x, int T, const float *cos_sin,
                               const int64_t *slot_mapping, const int64_t *block_tables,
                               int max_blocks, const int64_t *context_lens, int64_t max_context,
                               int block_size, float scale, const StackScratch *s,
                               const bf16 *final_norm, float final_eps, bf16 *out) {
    const bf16 *delta = NULL;
    for (int l = 0; l < num_layers; l++) {
        const LayerWeights *lw = w + l;
        const StackLayer *p = layers + l;
        const int H = lw->num_heads, KVH = lw->num_kv_heads, D = lw->head_dim, hid = lw->hidden;
        const int I = lw->inter, q_size = H * D, qkv_n = (H + 2 * KVH) * D;
        genserve_add_rmsnorm_bf16(x, delta, lw->ln1, s->h, T, hid, lw->eps);
        if (linear(s->h, hid, p->qkv, lw->qkv_bias, s->qkv, qkv_n, T, qkv_n, hid, 0)) return -1;
        genserve_qkv_post_bf16(s->qkv, T, H, KVH, D, cos_sin, lw->q_norm, lw->k_norm, lw->eps,
                               p->k_cache, p->v_cache, slot_mapping);
        if (genserve_paged_decode_attention_bf16(s->qkv, qkv_n, s->attn, q_size, p->k_cache,
                                                 p->v_cache, block_tables, max_blocks,
                                                 context_lens, max_context, T, H, KVH, D,
                                                 block_size, scale))
            return -1;
        if (linear(s->attn, q_size, p->o, NULL, s->o, hid, T, hid, q_size, 0)) return -1;
        genserve_add_rmsnorm_bf16(x, s->o, lw->ln2, s->h, T, hid, lw->eps);
        if (glu) {
            if (glu(s->h, hid, p->gate_up, s->act, I, T, I, hid)) return -1;
        } else {
            if (linear(s->h, hid, p->gate_up, NULL, s->gu, 2 * I, T, 2 * I, hid, 0)) return -1;
            genserve_silu_mul_bf16(s->gu, s->act, T, I);
        }
        if (linear(s->act, I, p->down, NULL, s->down, hid, T, hid, I, 0)) return -1;
        delta = s->down;
    }
    genserve_add_rmsnorm_bf16(x, delta, final_norm, out, T, w->hidden, final_eps);
    return 0;
}

/* ------------------------------------------------------------------------------- greedy */

/* out[r] = index of the first maximum of x[r, 0:n], as torch.argmax (NaN is never chosen
 * here; a row of -inf gives 0). 16 lanes each keep their first maximum; ties between lanes
 * go to the lowest index. */
void genserve_argmax_f32(const float *x, int rows, int64_t n, int64_t *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
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
    }
}

/* ----------------------------------------------------------------------------- sampling */

/* 16 probabilities from p (masked to `m`) summed in double */
static inline double sum16_pd(const float *p, __mmask16 m) {
    const __m512 v = _mm512_maskz_loadu_ps(m, p);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

/* out[r] = the token that u[r] (uniform in [0, 1)) picks from row r of probs [rows, n] (row
 * stride ld) by inverse CDF: the first j whose running sum of probabilities passes
 * u[r] * (the row's sum). A token of probability 0 is never picked; where rounding leaves the
 * target past every running sum, the last token of nonzero probability is; a row that sums to
 * zero or not to a finite number gives 0. Sums in double over 16-token blocks in a fixed
 * order: the pick depends only on the row and u[r], not on the batch. */
void genserve_sample_cdf_f32(const float *probs, int64_t ld, int rows, int64_t n, const double *u,
                             int64_t *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *p = probs + (int64_t)r * ld;
        double total = 0.0;
        for (int64_t j = 0; j < n; j += 16)
            total += sum16_pd(p + j, n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1));
        int64_t pick = 0;
        if (total > 0.0 && total < INFINITY) {
            const double target = u[r] * total;
            double run = 0.0;
            int64_t last = -1;
            for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const int64_t j1 = n - j0 >= 16 ? j0 + 16 : n;
                const double block = sum16_pd(p + j0, (__mmask16)((1u << (j1 - j0)) - 1));
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


/* the indices j of p[0:n] with lo <= p[j] < hi (floats), 16 lanes compared at a time */
#define FOR_IN_RANGE(p, n, lo, hi, j, body)                                                      \
    for (int64_t j0_ = 0; j0_ < (n); j0_ += 16) {                                                 \
        const __mmask16 in_ = (n) - j0_ >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << ((n) - j0_)) - 1); \
        const __m512 v_ = _mm512_maskz_loadu_ps(in_, (p) + j0_);                                  \
        __mmask16 hit_ = _mm512_mask_cmp_ps_mask(in_, v_, _mm512_set1_ps(lo), _CMP_GE_OQ);        \
        hit_ &= _mm512_cmp_ps_mask(v_, _mm512_set1_ps(hi), _CMP_LT_OQ);                          \
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
        const __m512 vc = _mm512_set1_ps(v_cut);
        const __m512i ic = _mm512_set1_epi32((int)(idx_cut < n ? idx_cut : n));
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const __mmask16 in = n - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j0)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(in, p + j0);
            const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32((int)j0));
            const __mmask16 under = _mm512_cmp_ps_mask(v, vc, _CMP_NGE_UQ); /* < v_cut, or NaN */
            const __mmask16 tied = _mm512_cmp_ps_mask(v, vc, _CMP_EQ_OQ) & _mm512_cmpge_epi32_mask(j, ic);
            _mm512_mask_storeu_ps(s + j0, in & (under | tied), _mm512_set1_ps(-INFINITY));
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
        const __m512 vk = _mm512_set1_ps(kth);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const __mmask16 in = n - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j0)) - 1);
            const __mmask16 under = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(in, s + j0), vk, _CMP_LT_OQ);
            _mm512_mask_storeu_ps(s + j0, in & under, _mm512_set1_ps(-INFINITY));
        }
    }
    return failed ? -1 : 0;
}

/* out[r] = log(sum_j exp(x[r, j])) for row r of x [rows, n] (row stride ld), as torch.logsumexp:
 * the row's maximum, then exp(x - max) summed in 16 fp32 lanes per 4,096 values and those in
 * double. A row of -inf gives -inf; a row holding +inf gives +inf. */
void genserve_logsumexp_f32(const float *x, int64_t ld, int rows, int64_t n, float *out) {
#pragma omp parallel for if (rows > 1)
    for (int r = 0; r < rows; r++) {
        const float *row = x + (int64_t)r * ld;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 in = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + j));
        }
        const float m = _mm512_reduce_max_ps(mx);
        if (!(m > -INFINITY && m < INFINITY)) {
            out[r] = m;
            continue;
        }
        const __m512 vm = _mm512_set1_ps(m);
        double total = 0.0;
        for (int64_t j0 = 0; j0 < n; j0 += 4096) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = j0; j < n && j < j0 + 4096; j += 16) {
                const __mmask16 in = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
                const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + j);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(in & _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                                             exp512(_mm512_sub_ps(v, vm))));
            }
            total += _mm512_reduce_add_ps(sum);
        }
        out[r] = (float)((double)m + log(total));
    }
}
