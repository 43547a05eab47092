/* The engine's frozen linears on the CPU: y = x @ W.T + b for few rows (plain C, built with cpu_kernels.c).

     ml_linear: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])      for m < rows, n < out_features

   W is stored once as panels (cpu_linear.PanelLinear): out_features cut into panels of NR = 16 rows of
   W, each stored k-major, [num_panels][in_features][NR], zero-padded past out_features. A decode step
   reads every weight of the model once, so the loop is built to stream them: each thread takes a
   contiguous run of panels (one sequential read), and for each panel a register-blocked micro-kernel
   computes MR = 6 rows x NR = 16 outputs at a time (12 AVX2 accumulators, the panel's two vectors per
   k loaded once and used by 6 rows), while the next panel is prefetched: the rows after the first 6
   then find the panel in cache, and the memory stream does not stall between panels. On the AMD EPYC
   it was measured on this is faster than oneDNN's packed weights at every row count of the engine's
   steps (benchmarks/README.md, "C linear").

   Without AVX2 + FMA (or with ML_PORTABLE_GEMM defined) the same loop runs a plain C micro-kernel. */

#include <stdint.h>
#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define NR 16
#define MR 6
#define PARALLEL_MIN_WEIGHTS 16384 /* below 64 KB of weights, waking the thread pool costs more than it saves */

static inline void store_rows(const float *acc, int mr, float *y, int64_t y_stride, int64_t cols, const float *bias) {
    for (int r = 0; r < mr; r++)
        for (int64_t j = 0; j < cols; j++) y[r * y_stride + j] = acc[r * NR + j] + (bias ? bias[j] : 0.0f);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(ML_PORTABLE_GEMM)
#include <immintrin.h>

/* Each accumulator is its own variable (not an array), so the compiler keeps all 12 in registers. */
#define FMA_ROW(r, lo, hi)                                            \
    if (mr > r) {                                                    \
        const __m256 a = _mm256_broadcast_ss(x + r * x_stride + kk); \
        lo = _mm256_fmadd_ps(a, b0, lo);                             \
        hi = _mm256_fmadd_ps(a, b1, hi);                             \
    }
#define SAVE_ROW(r, lo, hi)                        \
    if (mr > r) {                                 \
        _mm256_storeu_ps(acc + r * NR, lo);       \
        _mm256_storeu_ps(acc + r * NR + 8, hi);   \
    }

static inline __attribute__((always_inline)) void micro(const int mr, int64_t k, const float *x, int64_t x_stride,
                                                        const float *w, const float *next, float *y,
                                                        int64_t y_stride, int64_t cols, const float *bias) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t kk = 0; kk < k; kk++) {
        if (next) _mm_prefetch((const char *)(next + kk * NR), _MM_HINT_T0);
        const __m256 b0 = _mm256_loadu_ps(w + kk * NR), b1 = _mm256_loadu_ps(w + kk * NR + 8);
        FMA_ROW(0, c00, c01) FMA_ROW(1, c10, c11) FMA_ROW(2, c20, c21)
        FMA_ROW(3, c30, c31) FMA_ROW(4, c40, c41) FMA_ROW(5, c50, c51)
    }
    float acc[MR * NR];
    SAVE_ROW(0, c00, c01) SAVE_ROW(1, c10, c11) SAVE_ROW(2, c20, c21)
    SAVE_ROW(3, c30, c31) SAVE_ROW(4, c40, c41) SAVE_ROW(5, c50, c51)
    store_rows(acc, mr, y, y_stride, cols, bias);
}
#else
static inline void micro(const int mr, int64_t k, const float *x, int64_t x_stride, const float *w,
                         const float *next, float *y, int64_t y_stride, int64_t cols, const float *bias) {
    (void)next;
    float acc[MR * NR] = {0};
    for (int64_t kk = 0; kk < k; kk++) {
        const float *b = w + kk * NR;
        for (int r = 0; r < mr; r++) {
            const float a = x[r * x_stride + kk];
            for (int j = 0; j < NR; j++) acc[r * NR + j] += a * b[j];
        }
    }
    store_rows(acc, mr, y, y_stride, cols, bias);
}
#endif

void ml_linear(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const float *panels,
               int64_t out_features, const float *bias, float *y, int64_t y_stride, int64_t num_threads) {
    const int64_t num_panels = (out_features + NR - 1) / NR;
    const int64_t threads = in_features * out_features < PARALLEL_MIN_WEIGHTS ? 1 : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < num_panels; p++) {
        const float *w = panels + p * in_features * NR;
        const float *next = p + 1 < num_panels ? w + in_features * NR : NULL;
        const int64_t c0 = p * NR, cols = out_features - c0 < NR ? out_features - c0 : NR;
        const float *b = bias ? bias + c0 : NULL;
        for (int64_t m0 = 0; m0 < rows; m0 += MR) {
            const float *xm = x + m0 * x_stride;
            float *ym = y + m0 * y_stride + c0;
            switch (rows - m0 < MR ? rows - m0 : MR) { /* a constant mr: the unused rows compile away */
                case 1: micro(1, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
                case 2: micro(2, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
                case 3: micro(3, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
                case 4: micro(4, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
                case 5: micro(5, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
                default: micro(6, in_features, xm, x_stride, w, next, ym, y_stride, cols, b); break;
            }
        }
    }
}
