/* The step kernels cpu_decode.c chains (each also loaded on its own by cpu_kernels.py; semantics in the
   comment at the top of its file), and the bfloat16 widening the kernels share. */

#ifndef ML_CPU_KERNELS_H
#define ML_CPU_KERNELS_H

#include <stdint.h>
#include <string.h>

/* bfloat16 -> float32, exact: the bits shifted into the high half */
static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 bfloat16 -> 16 float32, exact */
static inline __m512 bf16x16_to_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* cpu_kernels.c */
void ml_rms_norm(const float *x, int64_t x_stride, const float *w, float *out, int64_t rows, int64_t dim, float eps);
void ml_silu_mul(const float *gu, int64_t rows, int64_t n, float *out);
void ml_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t x_stride, int64_t *out, int64_t num_threads);
void ml_rope_and_cache(float *qkv, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, const float *cos, const float *sin, void *k_cache, void *v_cache,
                       const int64_t *slots, const int64_t *positions, int64_t slot_stride, int64_t max_len,
                       int64_t cache_bf16);
int ml_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                        const int64_t *rows, const int64_t *slots, const int64_t *lengths, float *out,
                        int64_t out_stride, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t slot_stride, int64_t max_len, float scale, int64_t num_threads,
                        int64_t cache_bf16);

/* cpu_gemm.c */
void ml_linear(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const float *panels,
               int64_t out_features, const float *bias, float *y, int64_t y_stride, int64_t num_threads);
void ml_lora_group(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const void *a_panels,
                   int64_t k, int64_t rank, int64_t r_max, const int64_t *row_ranks, const float *row_scales,
                   float scale, const int64_t *b_panels, const int64_t *c0, const int64_t *c1, float *y,
                   int64_t y_stride, float *h, int64_t num_threads, int64_t bf16);

/* cpu_gemm_blocks.c */
void ml_linear_blocks(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const uint8_t *panels,
                      int64_t kind, int64_t out_features, const float *bias, float *y, int64_t y_stride,
                      int64_t num_threads);

#endif
