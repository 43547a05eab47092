/* Fused float32 CPU kernels of the native engine's step (plain C, loaded with ctypes by cpu_kernels.py).

   Each replaces a chain of small eager PyTorch ops whose dispatch costs more than their arithmetic at
   decode sizes (16 rows). Semantics, with torch as the reference (engine/torch_ops.py):

     ml_rms_norm:        out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w
     ml_rope_and_cache:  for the q and k heads of each qkv row r (position pos[r]):
                             x[:h] , x[h:] = x[:h]*cos - x[h:]*sin , x[h:]*cos + x[:h]*sin   (in place)
                         then k_cache[slot[r], head, pos[r]] = k[r, head]; same for v
     ml_decode_attention: for each decode row b (its sequence in slot[b], lengths[b] positions):
                             out[row[b], head] = softmax(q[row[b], head] . K[slot, kv(head), :len]^T * scale)
                                                 @ V[slot, kv(head), :len]
                         with kv(head) = head / (num_heads / num_kv_heads) (grouped-query attention)

     ml_silu_mul:        out[r, j] = silu(gu[r, j]) * gu[r, n + j],  silu(g) = g / (1 + exp(-g))

     ml_argmax_rows:     out[r] = the first j with x[r, j] = max_j x[r, j], a NaN counting as the max
                         (torch.argmax's choice, exactly: greedy sampling's pick per row)

   Loops are written for the auto-vectoriser (-O3 -march=native, reassociation allowed; with AVX-512,
   decode attention's query-key dots are intrinsics, qk16_d64); exp is a
   Cephes-style polynomial that vectorises (relative error ~2e-7), so results match torch to float
   rounding, not bit for bit.

   Threads: decode attention runs `num_threads` OpenMP threads over (sequence, KV head) pairs when
   built with -fopenmp and linked to torch's own libgomp (cpu_kernels.py), so they share its thread
   pool instead of competing with it. Built without OpenMP, it runs on the calling thread. The
   matmuls (linears, LoRA groups) are in cpu_gemm.c. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n as a float's bits */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

void ml_rms_norm(const float *x, int64_t x_stride, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * dim;
        float sum_sq = 0.0f;
        for (int64_t i = 0; i < dim; i++) sum_sq += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum_sq / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
    }
}

void ml_silu_mul(const float *gu, int64_t rows, int64_t n, float *out) {
    /* exp in one loop, the division in another: fused, the compiler computes the clamped lanes'
       g / (1 + exp(88)) for every lane and blends, and those subnormal quotients cost ~10x the loop */
    float e[256];
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * n, *u = g + n;
        float *o = out + r * n;
        for (int64_t j0 = 0; j0 < n; j0 += 256) {
            const int64_t len = n - j0 < 256 ? n - j0 : 256;
            for (int64_t j = 0; j < len; j++) e[j] = exp_poly(-g[j0 + j]);
            for (int64_t j = 0; j < len; j++) o[j0 + j] = g[j0 + j] / (1.0f + e[j]) * u[j0 + j];
        }
    }
}

/* one row's argmax as ml_argmax_rows states it */
static int64_t argmax_row(const float *x, int64_t n) {
    int64_t j = 0, found = 0, has_nan = 0;
    float best = -INFINITY;
#ifdef __AVX512F__
    if (n >= 16) { /* per lane: its first strict maximum; then the smallest index among the lanes at the max */
        __m512 top = _mm512_set1_ps(-INFINITY);
        __m512i at = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 v = _mm512_loadu_ps(x + j);
            const __mmask16 up = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_mask_mov_ps(top, up, v);
            at = _mm512_mask_mov_epi32(at, up, idx);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
        best = _mm512_reduce_max_ps(top);
        found = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_EQ_OQ), at);
        has_nan = nan != 0;
    }
#endif
    for (; j < n; j++) {
        if (x[j] != x[j]) has_nan = 1;
        if (x[j] > best) best = x[j], found = j;
    }
    if (has_nan)
        for (j = 0; j < n; j++)
            if (x[j] != x[j]) return j;
    return found;
}

void ml_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t x_stride, int64_t *out, int64_t num_threads) {
    const int64_t threads = rows < num_threads ? rows : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * x_stride, n);
}

/* float32 -> bfloat16, rounded to nearest even (NaN stays NaN) */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* n floats into the cache at element `at`: float32, or rounded to bfloat16 (cache_bf16) */
static inline void cache_store(void *cache, int64_t at, const float *x, int64_t n, int64_t cache_bf16) {
    if (cache_bf16) {
        uint16_t *c = (uint16_t *)cache + at;
        for (int64_t i = 0; i < n; i++) c[i] = to_bf16(x[i]);
    } else {
        memcpy((float *)cache + at, x, n * sizeof(float));
    }
}

void ml_rope_and_cache(float *qkv, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, const float *cos, const float *sin, void *k_cache, void *v_cache,
                       const int64_t *slots, const int64_t *positions, int64_t slot_stride, int64_t max_len,
                       int64_t cache_bf16) {
    const int64_t half = head_dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * row_stride;
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            float *x = row + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        const int64_t base = slots[r] * slot_stride + positions[r] * head_dim;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t at = base + h * max_len * head_dim;
            cache_store(k_cache, at, row + (num_heads + h) * head_dim, head_dim, cache_bf16);
            cache_store(v_cache, at, row + (num_heads + num_kv_heads + h) * head_dim, head_dim, cache_bf16);
        }
    }
}

#if defined(__AVX512F__)
#define HAVE_QK16 1
/* scores[j] = scale * (q . K[j]) for 16 rows of K [16][64]: 16 dot products whose 16-lane partial sums are
   reduced together (a transpose-add, ~3 operations a dot instead of ~8 for reducing each on its own).
   The sums run in another order than the scalar loop's: equal to float rounding. */
static inline __m512 load16(const void *p, int64_t i, const int bf16) { /* 16 floats from element i */
    return bf16 ? bf16x16_to_ps((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) void qk16_d64(const float *q, const void *K, const int bf16, float scale,
                                                           float *scores) {
    const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32),
                 q3 = _mm512_loadu_ps(q + 48);
    __m512 v[16];
    for (int j = 0; j < 16; j++) {
        __m512 a = _mm512_mul_ps(q0, load16(K, 64 * j, bf16));
        __m512 b = _mm512_mul_ps(q1, load16(K, 64 * j + 16, bf16));
        a = _mm512_fmadd_ps(q2, load16(K, 64 * j + 32, bf16), a);
        b = _mm512_fmadd_ps(q3, load16(K, 64 * j + 48, bf16), b);
        v[j] = _mm512_add_ps(a, b);
    }
    __m512 t[8], u[4];
    for (int j = 0; j < 8; j++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2j], v[2j+1] */
        t[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) { /* per lane: the lane sums of v[4j .. 4j+3] */
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t[2 * j]), _mm512_castps_pd(t[2 * j + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t[2 * j]), _mm512_castps_pd(t[2 * j + 1]));
        u[j] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    /* lane m of the result: u[m]'s four lanes summed */
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
    _mm512_storeu_ps(scores, _mm512_mul_ps(r, _mm512_set1_ps(scale)));
}
#endif

/* One (sequence, KV head) pair of decode attention for head_dim d; scores [group, max_len] is the calling
   thread's scratch. Inlined with d = 64 (SmolLM2, Llama) as a constant, so that the loops over d unroll:
   each K row is loaded once for the group's query heads, and each output row sums over t in registers
   (64 floats) instead of a read-modify-write of memory per t. */
static inline __attribute__((always_inline)) void attend_d(const float *qh, const void *K, const void *V,
                                                           const int bf16, int64_t len, int64_t group,
                                                           const int64_t d, int64_t max_len, float scale,
                                                           float *scores, float *o) {
    const float *Kf = (const float *)K, *Vf = (const float *)V;
    const uint16_t *Kh = (const uint16_t *)K, *Vh = (const uint16_t *)V;
    int64_t t0 = 0;
#ifdef HAVE_QK16
    if (d == 64) {
        for (int64_t g = 0; g < group; g++)
            for (int64_t t = 0; t + 16 <= len; t += 16)
                qk16_d64(qh + g * d, bf16 ? (const void *)(Kh + t * d) : (const void *)(Kf + t * d), bf16, scale,
                         scores + g * max_len + t);
        t0 = len / 16 * 16;
    }
#endif
    for (int64_t t = t0; t < len; t++) {
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qh + g * d;
            float dot = 0.0f;
            if (bf16)
                for (int64_t i = 0; i < d; i++) dot += qg[i] * bf16_to_float(Kh[t * d + i]);
            else
                for (int64_t i = 0; i < d; i++) dot += qg[i] * Kf[t * d + i];
            scores[g * max_len + t] = dot * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * max_len;
        float top = sg[0];
        for (int64_t t = 1; t < len; t++) top = sg[t] > top ? sg[t] : top;
        float total = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            sg[t] = exp_poly(sg[t] - top);
            total += sg[t];
        }
        const float inv = 1.0f / total;
        float acc[d];
        for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            const float p = sg[t];
            if (bf16)
                for (int64_t i = 0; i < d; i++) acc[i] += p * bf16_to_float(Vh[t * d + i]);
            else
                for (int64_t i = 0; i < d; i++) acc[i] += p * Vf[t * d + i];
        }
        for (int64_t i = 0; i < d; i++) o[g * d + i] = acc[i] * inv;
    }
}

static void attend_one(const float *qh, const void *K, const void *V, int64_t cache_bf16, int64_t len,
                       int64_t group, int64_t head_dim, int64_t max_len, float scale, float *scores, float *o) {
    if (head_dim == 64 && cache_bf16)
        attend_d(qh, K, V, 1, len, group, 64, max_len, scale, scores, o);
    else if (head_dim == 64)
        attend_d(qh, K, V, 0, len, group, 64, max_len, scale, scores, o);
    else
        attend_d(qh, K, V, cache_bf16 != 0, len, group, head_dim, max_len, scale, scores, o);
}

int ml_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                        const int64_t *rows, const int64_t *slots, const int64_t *lengths, float *out,
                        int64_t out_stride, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t slot_stride, int64_t max_len, float scale, int64_t num_threads,
                        int64_t cache_bf16) {
    const int64_t item = cache_bf16 ? 2 : 4; /* bytes per cache element */
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(|| : failed)
    {
        float *scores = malloc(sizeof(float) * group * max_len);
        failed = scores == NULL;
        if (!failed) {
            /* dynamic: sequences differ in length */
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t b = 0; b < batch; b++) {
                for (int64_t h = 0; h < num_kv_heads; h++) {
                    const int64_t at = slots[b] * slot_stride + h * max_len * head_dim;
                    attend_one(q + rows[b] * q_stride + h * group * head_dim, (const char *)k_cache + at * item,
                               (const char *)v_cache + at * item, cache_bf16, lengths[b], group, head_dim, max_len,
                               scale, scores,
                               out + rows[b] * out_stride + h * group * head_dim);
                }
            }
        }
        free(scores);
    }
    return failed;
}
