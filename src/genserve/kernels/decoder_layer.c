/* Decoder layers in one call. `genserve_decode_layer_bf16` runs a whole Llama-family decoder
 * layer for T single-token rows inside one OpenMP parallel region (every kernel set; on CPUs
 * without AMX it runs the decode steps of 1-2 rows): every matrix is streamed once in row bands
 * per thread (gemm.c), the small ops (small_ops.c) and attention (attention_decode.c) run
 * between barriers, each the same code the standalone kernels run, so a row gets the same bits
 * through the layer as through the separate kernels. `genserve_decode_stack_bf16` (every set)
 * runs every layer of a batched decode step on packed linears (AMX or panel).
 *
 * Rounding follows the PyTorch bf16 path (and transformers): every op's result is rounded to
 * bf16 where PyTorch would store a bf16 tensor; accumulation is fp32.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "kernels.h"
#ifdef GENSERVE_AMX
#include "amx.h"
#endif

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

static void mark_failed(int *failed) {
#pragma omp atomic write
    *failed = 1;
}

/* Returns 0, or -1 when a thread could not get its buffers (the step is lost: x is then
 * partly updated, the caller must not use it). */
int genserve_decode_layer_bf16(const LayerWeights *w, bf16 *x, int T, const float *cos_sin,
                               bf16 *k_cache, bf16 *v_cache, const int64_t *slot_mapping,
                               const int64_t *block_tables, int max_blocks,
                               const int64_t *context_lens, int block_size, const Scratch *s) {
    const int H = w->num_heads, KVH = w->num_kv_heads, D = w->head_dim, hid = w->hidden;
    const int qkv_n = (H + 2 * KVH) * D, I = w->inter, G = H / KVH;
    const AttnArgs aa = {k_cache, v_cache, block_tables, context_lens, max_blocks, block_size,
                         H, KVH, D, 1.0f / sqrtf((float)D)};
    /* attention scratch per thread (s->scores is no longer used), as the attention kernel's */
    const size_t attn_floats = attend_buffer_floats(&aa, s->max_context);
    int failed = 0;
#pragma omp parallel
    {
        /* a few hundred KiB, kept from step to step; NULL on every thread once one failed, so
         * every thread skips the step alike (same barriers) */
        float *buf = team_buffer(attn_floats, &failed);
        if (buf) {
#ifdef GENSERVE_AMX
            amx_tiles_16x64();
#endif
#pragma omp for
            for (int t = 0; t < T; t++) rmsnorm_row(x + (int64_t)t * hid, w->ln1, s->h + (int64_t)t * hid, hid, w->eps);
            if (gemm_omp(w->qkv, w->qkv_bias, s->h, hid, s->qkv, qkv_n, T, qkv_n, hid, OUT_BF16)) mark_failed(&failed);
#pragma omp barrier
            /* q/k norm (Qwen3), rotary, then K/V into the paged cache */
#pragma omp for
            for (int i = 0; i < T * (H + KVH); i++)
                qkv_head_post(s->qkv, qkv_n, i, H, KVH, D, cos_sin, w->q_norm, w->k_norm, w->eps,
                              k_cache, v_cache, slot_mapping);
#pragma omp for
            for (int i = 0; i < T * KVH; i++) {
                const int t = i / KVH, kvh = i % KVH;
                const int64_t head = (int64_t)kvh * G * D;
                attend_kv_group(&aa, s->qkv + (int64_t)t * qkv_n + head,
                                s->attn + (int64_t)t * H * D + head, buf, s->max_context, t, kvh);
            }
#ifdef GENSERVE_AMX
            _tile_release();
#endif
            if (gemm_omp(w->o, NULL, s->attn, H * D, x, hid, T, hid, H * D, OUT_ADD_BF16)) mark_failed(&failed);
#pragma omp barrier
#pragma omp for
            for (int t = 0; t < T; t++) rmsnorm_row(x + (int64_t)t * hid, w->ln2, s->h + (int64_t)t * hid, hid, w->eps);
            if (gemm_omp(w->gate_up, NULL, s->h, hid, s->gu, 2 * I, T, 2 * I, hid, OUT_BF16)) mark_failed(&failed);
#pragma omp barrier
#pragma omp for
            for (int t = 0; t < T; t++)
                silu_mul_row(s->gu + (int64_t)t * 2 * I, s->gu + (int64_t)t * 2 * I + I, s->act + (int64_t)t * I, I);
            if (gemm_omp(w->down, NULL, s->act, I, x, hid, T, hid, I, OUT_ADD_BF16)) mark_failed(&failed);
        }
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------ a batched decode step, every layer in one call
 * The layer loop of FusedDecode.forward_mixed for pure-decode steps whose linears are all packed
 * for `linear`, passed as a pointer: amx_linear.c's genserve_amx_linear_bf16 (the AMX library)
 * or panel_linear.c's genserve_panel_linear_bf16 (every set; `glu` then
 * genserve_panel_glu_bf16). Nothing here is AMX-specific: every set builds it. The same calls
 * in the same order, without going back to Python between them. */
typedef int (*LinearFn)(const bf16 *X, int ldx, const bf16 *P, const bf16 *bias, void *Y,
                        int ldy, int M, int N, int K, int out_f32);
/* genserve_amx_glu_bf16 / genserve_panel_glu_bf16: gate_up linear and silu_and_mul in one pass */
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
