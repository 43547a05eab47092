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
     ml_lora_group:      one LoRAGroup of one adapter's fused module group (lora_ops.lora_grouped_):
                             h[t] = x[t] @ A[:, :k * r_t] * scale_t       (r_t, scale_t: the row's own)
                             y[t, c0_m:c1_m] += h[t, m::k] @ B_m[:r_t]    for each member m of k

   Loops are written for the auto-vectoriser (-O3 -march=native, reassociation allowed); exp is a
   Cephes-style polynomial that vectorises (relative error ~2e-7), so results match torch to float
   rounding, not bit for bit. SiLU-mul is left to torch: its division made a C loop no faster on the
   AMD EPYC it was measured on.

   Threads: decode attention (over sequence x KV head) and the LoRA group (the shrink over slices of
   A's rows, summed after; the expand over output columns) run `num_threads` OpenMP threads when built
   with -fopenmp and linked to torch's own libgomp, so they share its thread pool instead of competing
   with it. Groups that read under PARALLEL_MIN_FLOATS of weights stay on the calling thread: waking
   the pool costs more than they do. A row's result depends on the thread count (the shrink's
   summation order), never on the other rows of the batch. Built without OpenMP, everything runs on
   the calling thread. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#define PARALLEL_MIN_FLOATS 16384  /* 64 KB of weights */

/* Thread `part` of `parts` takes columns [*lo, *hi) of [0, n), cut at multiples of 16 floats (64 bytes,
   a cache line) so no two threads write one line. */
static inline void column_chunk(int64_t n, int part, int parts, int64_t *lo, int64_t *hi) {
    const int64_t size = ((n + parts - 1) / parts + 15) & ~(int64_t)15;
    *lo = part * size < n ? part * size : n;
    *hi = (part + 1) * size < n ? (part + 1) * size : n;
}

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

void ml_rope_and_cache(float *qkv, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, const float *cos, const float *sin, float *k_cache, float *v_cache,
                       const int64_t *slots, const int64_t *positions, int64_t slot_stride, int64_t max_len) {
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
            memcpy(k_cache + at, row + (num_heads + h) * head_dim, head_dim * sizeof(float));
            memcpy(v_cache + at, row + (num_heads + num_kv_heads + h) * head_dim, head_dim * sizeof(float));
        }
    }
}

/* One (sequence, KV head) pair of decode attention; scores [group, max_len] and acc [group, head_dim]
   are the calling thread's scratch. */
static void attend_one(const float *qh, const float *K, const float *V, int64_t len, int64_t group,
                       int64_t head_dim, int64_t max_len, float scale, float *scores, float *acc, float *o) {
    for (int64_t t = 0; t < len; t++) {
        const float *kt = K + t * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qh + g * head_dim;
            float dot = 0.0f;
            for (int64_t i = 0; i < head_dim; i++) dot += qg[i] * kt[i];
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
        for (int64_t t = 0; t < len; t++) sg[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * group * head_dim);
    for (int64_t t = 0; t < len; t++) {
        const float *vt = V + t * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * max_len + t];
            float *ag = acc + g * head_dim;
            for (int64_t i = 0; i < head_dim; i++) ag[i] += p * vt[i];
        }
    }
    memcpy(o, acc, sizeof(float) * group * head_dim);
}

int ml_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                        const int64_t *rows, const int64_t *slots, const int64_t *lengths, float *out,
                        int64_t out_stride, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t slot_stride, int64_t max_len, float scale, int64_t num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(|| : failed)
    {
        float *scores = malloc(sizeof(float) * group * max_len);
        float *acc = malloc(sizeof(float) * group * head_dim);
        failed = scores == NULL || acc == NULL;
        if (!failed) {
            /* dynamic: sequences differ in length */
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t b = 0; b < batch; b++) {
                for (int64_t h = 0; h < num_kv_heads; h++) {
                    const int64_t at = slots[b] * slot_stride + h * max_len * head_dim;
                    attend_one(q + rows[b] * q_stride + h * group * head_dim, k_cache + at, v_cache + at,
                               lengths[b], group, head_dim, max_len, scale, scores, acc,
                               out + rows[b] * out_stride + h * group * head_dim);
                }
            }
        }
        free(scores);
        free(acc);
    }
    return failed;
}

void ml_lora_group(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const float *lora_A,
                   int64_t a_stride, int64_t k, int64_t rank, const int64_t *row_ranks, const float *row_scales,
                   float scale, const int64_t *lora_B, const int64_t *b_strides, const int64_t *c0,
                   const int64_t *c1, float *y, int64_t y_stride, float *h, int64_t num_threads) {
    /* h [num_threads, rows, k * rank] scratch; h[0] ends up holding x @ A. */
    const int64_t width = k * rank, size = rows * k * rank;
    int64_t weight_floats = in_features * width;
    for (int64_t m = 0; m < k; m++) weight_floats += rank * (c1[m] - c0[m]);
    const int64_t threads = weight_floats < PARALLEL_MIN_FLOATS ? 1 : num_threads;
#pragma omp parallel num_threads(threads)
    {
        const int part = omp_get_thread_num(), parts = omp_get_num_threads();
        /* Shrink: each thread streams its own contiguous slice of A's rows into its own partial h; row t
           only computes its own k * r_t columns, so a rank-1 row costs 1/rank of a rank-`rank` row. */
        const int64_t span = (in_features + parts - 1) / parts;
        const int64_t i0 = part * span < in_features ? part * span : in_features;
        const int64_t i1 = i0 + span < in_features ? i0 + span : in_features;
        float *hp = h + part * size;
        memset(hp, 0, sizeof(float) * size);
        for (int64_t i = i0; i < i1; i++) {
            const float *a = lora_A + i * a_stride;
            for (int64_t t = 0; t < rows; t++) {
                const int64_t w = row_ranks ? k * row_ranks[t] : width;
                const float xv = x[t * x_stride + i];
                float *ht = hp + t * width;
                for (int64_t c = 0; c < w; c++) ht[c] += xv * a[c];
            }
        }
        int64_t lo, hi;
        if (parts > 1) {
#pragma omp barrier
            column_chunk(size, part, parts, &lo, &hi);
            for (int q = 1; q < parts; q++)
                for (int64_t c = lo; c < hi; c++) h[c] += h[q * size + c];
#pragma omp barrier
        }
        /* Expand: each thread streams its columns of every member's B rows, added into every row's output. */
        for (int64_t m = 0; m < k; m++) {
            const float *b = (const float *)(intptr_t)lora_B[m];
            column_chunk(c1[m] - c0[m], part, parts, &lo, &hi);
            for (int64_t j = 0; j < rank; j++) {
                const float *bj = b + j * b_strides[m];
                for (int64_t t = 0; t < rows; t++) {
                    if (row_ranks && j >= row_ranks[t]) continue;
                    const float coef = h[t * width + j * k + m] * (row_scales ? row_scales[t] : scale);
                    float *yt = y + t * y_stride + c0[m];
                    for (int64_t o = lo; o < hi; o++) yt[o] += coef * bj[o];
                }
            }
        }
    }
}
