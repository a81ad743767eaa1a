/* Causal prefill attention over the paged cache, for S chunks at once.
 *
 * `genserve_prefill_attention_bf16` (every kernel set): each query is attended as a decode row
 * whose context ends at its own position (attention_decode.c's attend_kv_group), so a token's
 * attention is the same bits whether it is computed in a prefill chunk or as a decode row.
 *
 * `genserve_prefill_attention_amx` (the amx set): causal attention of S prefill chunks (rows row_starts[s] .. + num_tokens[s] of the qkv buffer,
 * whose K/V are already in the cache) over their whole context (cached prefix + the chunk),
 * read from the paged cache. Per (chunk, KV head): K^T and V are packed once into tile layout
 * (pairs interleaved), then each of the G query heads takes 16 queries at a time:
 * S = Q K^T in tiles (fp32), a row softmax in fp32, P rounded to bf16 (as PyTorch's flash
 * attention rounds it before P.V), O = P V in tiles (fp32), scaled by 1/sum, rounded once. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "vec_math.h"
#ifdef GENSERVE_AMX
#include "amx.h"
#endif

/* qkv rows of (H + 2 KVH) D at stride ld; out rows of H D at stride ldo; tables [S, max_blocks];
 * chunk s: rows row_starts[s] .. + num_tokens[s], its K/V already in the cache, context (cached
 * prefix + the chunk) context_lens[s]. Returns 0, or -1 (nothing written) for an unsupported
 * head layout or when memory ran out. */
int genserve_prefill_attention_bf16(const bf16 *qkv, int64_t ld, bf16 *out, int64_t ldo,
                                    const bf16 *k_cache, const bf16 *v_cache,
                                    const int64_t *block_tables, int max_blocks,
                                    const int64_t *row_starts, const int64_t *num_tokens,
                                    const int64_t *context_lens, int S, int H, int KVH, int D,
                                    int block_size, float scale) {
    if (H % KVH || H / KVH > 64 || D > 256) return -1;
    int64_t max_ctx = 0, rows = 0;
    for (int s = 0; s < S; s++) {
        max_ctx = context_lens[s] > max_ctx ? context_lens[s] : max_ctx;
        rows += num_tokens[s];
    }
    const int G = H / KVH;
    const AttnArgs shape = {k_cache, v_cache, block_tables, context_lens, max_blocks, block_size,
                            H, KVH, D, scale};
    const size_t need = attend_buffer_floats(&shape, max_ctx);
    int failed = 0;
#pragma omp parallel
    {
        float *buf = team_buffer(need, &failed);
        if (buf) {
#ifdef GENSERVE_AMX
            amx_tiles_16x64();
#endif
            /* item: (query row, KV head), the chunk's rows in order; the chunk found by a walk
             * from the previous item's (S is small) */
#pragma omp for schedule(dynamic, 16)
            for (int64_t i = 0; i < rows * KVH; i++) {
                const int64_t row = i / KVH;
                const int kvh = (int)(i % KVH);
                int s = 0;
                int64_t first = 0;
                while (row >= first + num_tokens[s]) first += num_tokens[s++];
                const int64_t j = row - first; /* the query's place in its chunk */
                const int64_t len = context_lens[s] - num_tokens[s] + j + 1;
                const AttnArgs a = {k_cache, v_cache, block_tables + (int64_t)s * max_blocks,
                                    &len, max_blocks, block_size, H, KVH, D, scale};
                const int64_t head = (int64_t)kvh * G * D;
                attend_kv_group(&a, qkv + (row_starts[s] + j) * ld + head,
                                out + (row_starts[s] + j) * ldo + head, buf, max_ctx, 0, kvh);
            }
#ifdef GENSERVE_AMX
            _tile_release();
#endif
        }
    }
    return failed ? -1 : 0;
}

#ifdef GENSERVE_AMX
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
        float *buf = team_buffer(need, &failed);
        if (buf) {
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
