/* Paged decode attention: each row's query heads against its context in the paged KV cache
 * ([slots, KVH, D] bf16, slots found through the row's block table), softmax in fp32, the
 * output rounded once to bf16. The G query heads sharing a KV head are one work item, so K and V
 * are read once for the group; a head's result depends only on its own row and context. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "vec_math.h"
#ifdef GENSERVE_AMX
#include "amx.h" /* attention scores in tiles */
#endif

float *thread_buffer(size_t n) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    return (float *)grow_buffer(&buf, &cap, n * sizeof(float));
}

float *team_buffer(size_t n, int *failed) {
    float *buf = thread_buffer(n);
    if (!buf) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int any;
#pragma omp atomic read
    any = *failed;
    return any ? NULL : buf;
}

/* scores [H][lenp], key rows [lenp] int64, then two [G][D] (query copy, accumulators) */
size_t attend_buffer_floats(const AttnArgs *a, int64_t max_context) {
    const size_t lenp = (size_t)(max_context + 15) / 16 * 16;
    const size_t G = (size_t)(a->num_heads / a->num_kv_heads);
    return (size_t)a->num_heads * lenp + 2 * lenp + 2 * G * a->head_dim + 16;
}

static inline void prefetch_row(const bf16 *row, int d) { /* d bf16s into L1 */
    for (int off = 0; off < d * 2; off += 64) _mm_prefetch((const char *)row + off, _MM_HINT_T0);
}

#if defined(__AVX512BF16__)
static inline __m512bh load_bh(const bf16 *p, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
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

#else /* AVX2: used only for head sizes the vector path does not take */
static float dot_bf16(const bf16 *a, const bf16 *b, int d) {
    float acc = 0.0f;
    for (int k = 0; k < d; k++) acc += bf2f(a[k]) * bf2f(b[k]);
    return acc;
}
#endif

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

#if defined(__AVX512BF16__)
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


/* vectorised when whole 32-dim chunks and up to 16 query heads a KV head */
static int vector_heads(const AttnArgs *a) {
    return a->head_dim % 32 == 0 && a->num_heads / a->num_kv_heads <= 16;
}

#else
/* key offsets in the cache of the row's context, block by block: rows[j] for key j */
static void key_rows(const AttnArgs *a, int t, int kvh, int64_t *rows) {
    const int64_t len = a->context_lens[t], bs = a->block_size;
    const int64_t *table = a->block_tables + (int64_t)t * a->max_blocks;
    for (int64_t j = 0, b = 0; j < len; b++)
        for (int64_t r = 0, base = table[b] * bs; r < bs && j < len; r++, j++)
            rows[j] = ((base + r) * a->num_kv_heads + kvh) * a->head_dim;
}

/* attend_group on 8-lane AVX2 for head_dim a multiple of 16: q . k as gemm.c's dot (16 dims
 * a 256-bit load, even dims by a shift, odd by a mask, q converted once in that order), softmax
 * with exp256, P.V with 64 output dims in registers over the keys. */
static void attend_heads_avx2(const AttnArgs *a, const bf16 *q, bf16 *out, float *buf,
                              int64_t lenp, int t, int kvh) {
    const int d = a->head_dim, G = a->num_heads / a->num_kv_heads;
    const int64_t len = a->context_lens[t];
    float *scores = buf;                           /* [G][lenp] */
    int64_t *rows = (int64_t *)(buf + (size_t)G * lenp); /* [lenp] */
    float *qf = buf + (size_t)G * lenp + 2 * (size_t)lenp; /* [G][d], even|odd per 16 dims */
    key_rows(a, t, kvh, rows);
    for (int i = 0; i < G * d; i++) qf[(i & ~15) + ((i & 1) << 3) + ((i & 15) >> 1)] = bf2f(q[i]);
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    const __m256 scale = _mm256_set1_ps(a->scale);
    for (int g = 0; g < G; g++) {
        const float *qg = qf + (int64_t)g * d;
        float *sg = scores + (int64_t)g * lenp;
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int64_t j0 = 0; j0 < len; j0 += 8) {
            float s8[8];
            const int n = len - j0 < 8 ? (int)(len - j0) : 8;
            for (int jj = 0; jj < 8; jj++) {
                if (g == 0 && j0 + jj + 8 < len) prefetch_row(a->k_cache + rows[j0 + jj + 8], d);
                const bf16 *k = a->k_cache + rows[j0 + (jj < n ? jj : 0)];
                __m256 acc = _mm256_setzero_ps();
                for (int c = 0; c < d; c += 16) {
                    const __m256i kv = _mm256_loadu_si256((const __m256i *)(k + c));
                    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(kv, 16)), _mm256_loadu_ps(qg + c), acc);
                    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(kv, odd)), _mm256_loadu_ps(qg + c + 8), acc);
                }
                s8[jj] = jj < n ? hsum8(acc) : -INFINITY;
            }
            const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(s8), scale); /* -inf * scale: -inf */
            _mm256_storeu_ps(sg + j0, sc);
            mx = _mm256_max_ps(mx, sc);
        }
        const __m256 hmax = _mm256_set1_ps(hmax8(mx));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < len; j0 += 8) {
            const int n = len - j0 < 8 ? (int)(len - j0) : 8;
            const __m256 in = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)n), _CMP_LT_OQ);
            const __m256 e = _mm256_and_ps(in, exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + j0), hmax)));
            _mm256_storeu_ps(sg + j0, e);
            sum = _mm256_add_ps(sum, e);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sum));
        for (int c0 = 0; c0 < d; c0 += 64) {
            const int nv = d - c0 < 64 ? (d - c0) / 8 : 8;
            __m256 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
            for (int64_t j = 0; j < len; j++) {
                const bf16 *v = a->v_cache + rows[j] + c0;
                if (j + 4 < len) prefetch_row(a->v_cache + rows[j + 4] + c0, nv * 8);
                const __m256 p = _mm256_set1_ps(sg[j]);
                for (int c = 0; c < nv; c++) acc[c] = _mm256_fmadd_ps(p, load_bf16x8(v + 8 * c), acc[c]);
            }
            for (int c = 0; c < nv; c++) store_bf16x8(out + (int64_t)g * d + c0 + 8 * c, _mm256_mul_ps(acc[c], inv));
        }
    }
}

static int vector_heads(const AttnArgs *a) { return a->head_dim % 16 == 0; }
#endif

void attend_kv_group(const AttnArgs *a, const bf16 *q, bf16 *out, float *buf, int64_t max_context,
                     int t, int kvh) {
    const int64_t lenp = (max_context + 15) / 16 * 16;
    const int G = a->num_heads / a->num_kv_heads;
    if (!vector_heads(a)) {
        attend_group(a, q, out, buf + (size_t)G * a->head_dim, buf, t, kvh, G);
        return;
    }
#if defined(__AVX512BF16__)
    attend_heads_avx512(a, q, out, buf, (int64_t *)(buf + (size_t)a->num_heads * lenp), lenp, t,
                        kvh, 1, G);
#else
    attend_heads_avx2(a, q, out, buf, lenp, t, kvh);
#endif
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
#if defined(__AVX512BF16__)
    /* a row's KV heads in one work item once there are rows enough to share out (the same
     * per-head arithmetic as one KV head an item) */
    const int per_row = vector_heads(&aa) && H * (D / 16) <= 256 && T >= 4 * omp_get_max_threads();
#else
    const int per_row = 0;
#endif
#pragma omp parallel
    {
        float *buf = team_buffer(attend_buffer_floats(&aa, max_context), &failed);
#ifdef GENSERVE_AMX
        amx_tiles_16x64();
#endif
#pragma omp for schedule(dynamic)
        for (int i = 0; i < (per_row ? T : T * KVH); i++) {
            if (!buf) continue;
            const int t = per_row ? i : i % T, kvh = per_row ? 0 : i / T;
            const int64_t head = (int64_t)kvh * G * D;
#if defined(__AVX512BF16__)
            if (per_row) {
                const int64_t lenp = (max_context + 15) / 16 * 16;
                attend_heads_avx512(&aa, q + t * ldq, out + t * ldo, buf,
                                    (int64_t *)(buf + (size_t)H * lenp), lenp, t, 0, KVH, G);
                continue;
            }
#endif
            attend_kv_group(&aa, q + t * ldq + head, out + t * ldo + head, buf, max_context, t, kvh);
        }
#ifdef GENSERVE_AMX
        _tile_release();
#endif
    }
    return failed ? -1 : 0;
}
