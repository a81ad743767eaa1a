/* What the kernel sources call in each other: internal to the one library a kernel set builds
 * from them all (hidden: only the genserve_* entry points are exported). */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "bf16.h"

#define HIDDEN __attribute__((visibility("hidden")))

/* ------------------------------------------------------------------------------ gemm.c */
enum { OUT_BF16 = 0, OUT_F32 = 1, OUT_ADD_BF16 = 2 };

/* Inside a parallel region: Y[M, N] (op)= X[M, K] W[N, K]^T (+ bias), N split in bands over
 * the threads (no barrier). OUT_ADD_BF16: Y = bf16(Y + bf16(dot)), the residual add. Returns
 * 0, or -1 when this thread got no X buffer (its band then not written). */
HIDDEN int gemm_omp(const bf16 *W, const bf16 *bias, const bf16 *X, int ldx, void *Y, int ldy,
                    int M, int N, int K, int mode);

/* --------------------------------------------------------------------------- small_ops.c */
/* out[0:n] = w * bf16(x * rsqrt(mean(x^2) + eps)), the transformers RMSNorm in bf16 */
HIDDEN void rmsnorm_row(const bf16 *x, const bf16 *w, bf16 *out, int n, float eps);
/* item i of T * (H + KVH) heads of a [T, ld] qkv buffer: q/k norm, rotary, K/V cache write */
HIDDEN void qkv_head_post(bf16 *qkv, int64_t ld, int i, int H, int KVH, int D,
                          const float *cos_sin, const bf16 *q_norm, const bf16 *k_norm, float eps,
                          bf16 *k_cache, bf16 *v_cache, const int64_t *slot_mapping);
/* act[0:I] = bf16(bf16(silu(g)) * u) */
HIDDEN void silu_mul_row(const bf16 *g, const bf16 *u, bf16 *act, int I);

/* -------------------------------------------------------------------- attention_decode.c */
typedef struct {
    const bf16 *k_cache, *v_cache; /* [slots, KVH, D] */
    const int64_t *block_tables;   /* [T, max_blocks] */
    const int64_t *context_lens;   /* [T] */
    int max_blocks, block_size, num_heads, num_kv_heads, head_dim;
    float scale;
} AttnArgs;

/* n floats for the calling thread, reused every call (NULL when out of memory) */
HIDDEN float *thread_buffer(size_t n);
/* Inside a parallel region, called by every thread: its thread_buffer(n), or NULL on every
 * thread once any thread's allocation failed (*failed then set), so no thread takes work it
 * cannot do. */
HIDDEN float *team_buffer(size_t n, int *failed);
/* floats of thread buffer attend_kv_group needs for contexts up to max_context */
HIDDEN size_t attend_buffer_floats(const AttnArgs *a, int64_t max_context);
/* Row t's G = H / KVH query heads that share KV head kvh (q, out point at the first of them):
 * softmax(q K^T * scale) V over the row's paged context, fp32, rounded once. The same code for
 * every row and batch size: a head's result depends only on its own row. */
HIDDEN void attend_kv_group(const AttnArgs *a, const bf16 *q, bf16 *out, float *buf,
                            int64_t max_context, int t, int kvh);

/* ------------------------------------------------- entry points the AMX layer stack calls */
void genserve_add_rmsnorm_bf16(bf16 *x, const bf16 *delta, const bf16 *w, bf16 *out, int T,
                               int hid, float eps);
void genserve_qkv_post_bf16(bf16 *qkv, int T, int H, int KVH, int D, const float *cos_sin,
                            const bf16 *q_norm, const bf16 *k_norm, float eps, bf16 *k_cache,
                            bf16 *v_cache, const int64_t *slot_mapping);
void genserve_silu_mul_bf16(const bf16 *gu, bf16 *act, int T, int I);
int genserve_paged_decode_attention_bf16(const bf16 *q, int64_t ldq, bf16 *out, int64_t ldo,
                                         const bf16 *k_cache, const bf16 *v_cache,
                                         const int64_t *block_tables, int max_blocks,
                                         const int64_t *context_lens, int64_t max_context, int T,
                                         int H, int KVH, int D, int block_size, float scale);
