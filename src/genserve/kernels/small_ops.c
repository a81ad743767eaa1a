/* The element-wise ops between a decoder layer's matmuls, over rows of bf16, rounded where
 * PyTorch's bf16 path rounds (and transformers): residual add + RMSNorm, q/k RMSNorm + rotary +
 * the paged K/V cache write, SiLU-and-mul. Written once over `v_*` vectors (VL lanes of the
 * kernel set); each row is computed alone, so its result does not depend on the batch. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec_math.h"

void rmsnorm_row(const bf16 *x, const bf16 *w, bf16 *out, int n, float eps) {
    if (n % VL == 0) { /* the same rounding, VL lanes at a time (another order of the fp32 sum) */
        vfloat ss = v_zero();
        for (int i = 0; i < n; i += VL) {
            const vfloat v = v_load_bf16(x + i);
            ss = v_fmadd(v, v, ss);
        }
        const vfloat inv = v_set1(1.0f / sqrtf(v_hsum(ss) / (float)n + eps));
        for (int i = 0; i < n; i += VL)
            v_store_bf16(out + i, v_mul(v_load_bf16(w + i), v_round_bf16(v_mul(v_load_bf16(x + i), inv))));
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
    for (; i + VL <= h; i += VL) {
        const vfloat x1 = v_load_bf16(x + i), x2 = v_load_bf16(x + i + h);
        const vfloat c = v_loadu(cs + i), sn = v_loadu(cs + h + i);
        v_store_bf16(x + i, v_fmsub(x1, c, v_mul(x2, sn)));
        v_store_bf16(x + i + h, v_fmadd(x2, c, v_mul(x1, sn)));
    }
    for (; i < h; i++) {
        const float x1 = bf2f(x[i]), x2 = bf2f(x[i + h]);
        const float c = cs[i], s = cs[h + i];
        x[i] = f2bf(x1 * c - x2 * s);
        x[i + h] = f2bf(x2 * c + x1 * s);
    }
}

void qkv_head_post(bf16 *qkv, int64_t ld, int i, int H, int KVH, int D, const float *cos_sin,
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

void silu_mul_row(const bf16 *g, const bf16 *u, bf16 *a, int I) {
    int j = 0;
    for (; j + VL <= I; j += VL)
        v_store_bf16(a + j, v_mul(v_silu_bf16(v_load_bf16(g + j)), v_load_bf16(u + j)));
    for (; j < I; j++) {
        const float gf = bf2f(g[j]);
        a[j] = f2bf(rbf(gf / (1.0f + expf(-gf))) * bf2f(u[j]));
    }
}

/* x[t] = bf16(x[t] + delta[t]) when delta is given (the residual add), then out[t] = rmsnorm(x[t]) */
void genserve_add_rmsnorm_bf16(bf16 *x, const bf16 *delta, const bf16 *w, bf16 *out, int T,
                               int hid, float eps) {
#pragma omp parallel for
    for (int t = 0; t < T; t++) {
        bf16 *xr = x + (int64_t)t * hid;
        if (delta) {
            const bf16 *dr = delta + (int64_t)t * hid;
            int i = 0;
            for (; i + VL <= hid; i += VL) v_store_bf16(xr + i, v_add(v_load_bf16(xr + i), v_load_bf16(dr + i)));
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
    for (int t = 0; t < T; t++)
        silu_mul_row(gu + (int64_t)t * 2 * I, gu + (int64_t)t * 2 * I + I, act + (int64_t)t * I, I);
}
