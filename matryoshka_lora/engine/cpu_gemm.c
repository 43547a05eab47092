/* The engine's matmuls on the CPU (plain C, built with cpu_kernels.c): the frozen linears and the LoRA groups.

     ml_linear:      y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])              m < rows, n < out_features
     ml_lora_group:  one LoRAGroup of one adapter's fused module group (lora_ops.lora_grouped_):
                         h[t] = x[t] @ A[:, :k * R]                          R = the group's rank
                         h[t, c] *= scale_t if c < k * r_t else 0             (r_t, scale_t: row t's own)
                         y[t, c0_m:c1_m] += h[t, m::k] @ B_m[:R]              for each member m of k

   Both run one routine, `tile_gemm`: y[rows, cols] (=|+=) x[rows, K] @ w[K, cols] for a panel w of
   NR = 16 columns, [K][16] (cols <= 16 of them kept). Its register-blocked
   micro-kernel computes MR = 6 rows x 16 columns at a time (12 AVX2 accumulators; each k's two
   vectors of w are loaded once and used by 6 rows), or with AVX-512 12 rows x 16 columns (one vector
   per k, one FMA per row; the same bits).

   Weights: a linear's W is stored once as panels (cpu_linear.PanelLinear): its outputs cut into panels
   of 16, each k-major, [num_panels][in_features][16], zero-padded, so each panel is one sequential
   read and the next is prefetched while the row tiles after the first find the current one in cache.
   A LoRA's A [in, k * r_max] and each B_m [r_max, out_m] are kept as panels of 16 columns the same way
   (cpu_kernels.CKernelOps packs them once per adapter): a rank-r group reads A's first ceil(k r / 16)
   panels and the first r rows of each B panel, each one sequential read, so its cost is O(r). A masked
   group (several ranks, rows ordered by rank) reads the weights once at its rank R, and each row computes
   only up to its own rank: the shrink's column blocks and the expand's rank chunks ([0, 16), [16, 32),
   [32, 64), ...) run for the rows whose rank reaches them, so a rank-1 row beside rank-64 rows pays for
   one block and one chunk, not for rank 64. The chunks are fixed, so a row's sums do not depend on the
   rows beside it. An adapter whose weights are all bfloat16 values (one saved in bfloat16) keeps its
   panels in bfloat16 (half the bytes; widened to float32 in registers, exactly), else in float32.

   Threads: each call splits its column blocks over `num_threads` OpenMP threads (torch's pool: see
   cpu_kernels.py), one contiguous run each; a LoRA shrink of fewer blocks than threads (a low rank)
   splits its rows instead. Calls that read under PARALLEL_MIN_WEIGHTS floats per 16 rows stay on the
   calling thread. Each output element is computed by one thread in a fixed order, so results do
   not depend on the thread count or on the other rows of the batch.

   Without AVX2 + FMA (or with ML_PORTABLE_GEMM defined) a plain C micro-kernel runs the same loops. */

#include <string.h>

#include "cpu_gemm.h"
#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(ML_PORTABLE_GEMM)
#include <immintrin.h>

/* Each accumulator is its own variable (not an array), so the compiler keeps all 12 in registers. */
#define FMA_ROW(r, lo, hi)                                            \
    if (mr > r) {                                                    \
        const __m256 a = _mm256_broadcast_ss(x + r * x_stride + kk); \
        lo = _mm256_fmadd_ps(a, b0, lo);                             \
        hi = _mm256_fmadd_ps(a, b1, hi);                             \
    }
#define SAVE_ROW(r, lo, hi)                      \
    if (mr > r) {                               \
        _mm256_storeu_ps(acc + r * NR, lo);     \
        _mm256_storeu_ps(acc + r * NR + 8, hi); \
    }

/* 8 bfloat16 -> 8 float32 (exact: the bits shifted into the high half) */
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* acc[mr, 16] = x[mr, :k] @ w[:k, :16] for a panel w ([k][16], float32 or bfloat16), prefetching the panel
   `next` meanwhile. */
static inline __attribute__((always_inline)) void micro(const int mr, const int bf16, int64_t k, const float *x,
                                                        int64_t x_stride, const void *w, const void *next,
                                                        float *acc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int64_t row_bytes = NR * (bf16 ? 2 : 4);
    for (int64_t kk = 0; kk < k; kk++) {
        if (next) _mm_prefetch((const char *)next + kk * row_bytes, _MM_HINT_T0);
        __m256 b0, b1;
        if (bf16) {
            const uint16_t *wk = (const uint16_t *)w + kk * NR;
            b0 = load_bf16x8(wk), b1 = load_bf16x8(wk + 8);
        } else {
            const float *wk = (const float *)w + kk * NR;
            b0 = _mm256_loadu_ps(wk), b1 = _mm256_loadu_ps(wk + 8);
        }
        FMA_ROW(0, c00, c01) FMA_ROW(1, c10, c11) FMA_ROW(2, c20, c21)
        FMA_ROW(3, c30, c31) FMA_ROW(4, c40, c41) FMA_ROW(5, c50, c51)
    }
    SAVE_ROW(0, c00, c01) SAVE_ROW(1, c10, c11) SAVE_ROW(2, c20, c21)
    SAVE_ROW(3, c30, c31) SAVE_ROW(4, c40, c41) SAVE_ROW(5, c50, c51)
}

#if defined(__AVX512F__) && !defined(ML_NO_AVX512_GEMM)
/* The same tile on AVX-512: each k's 16 weights in one vector, used by up to 12 rows (12 accumulators),
   one FMA per row and k instead of two. Each output still sums over k in order with one FMA a term,
   so it gives the AVX2 micro-kernel's bits. */
#define TILE_ROWS 12
#define FMA_ROW16(r, c) \
    if (mr > r) c = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + kk]), b, c);
#define SAVE_ROW16(r, c) \
    if (mr > r) _mm512_storeu_ps(acc + r * NR, c);

static inline __attribute__((always_inline)) void micro16(const int mr, const int bf16, int64_t k, const float *x,
                                                          int64_t x_stride, const void *w, const void *next,
                                                          float *acc) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
    const int64_t row_bytes = NR * (bf16 ? 2 : 4);
    for (int64_t kk = 0; kk < k; kk++) {
        if (next) _mm_prefetch((const char *)next + kk * row_bytes, _MM_HINT_T0);
        const __m512 b = bf16 ? bf16x16_to_ps((const uint16_t *)w + kk * NR) : _mm512_loadu_ps((const float *)w + kk * NR);
        FMA_ROW16(0, c0) FMA_ROW16(1, c1) FMA_ROW16(2, c2) FMA_ROW16(3, c3) FMA_ROW16(4, c4) FMA_ROW16(5, c5)
        FMA_ROW16(6, c6) FMA_ROW16(7, c7) FMA_ROW16(8, c8) FMA_ROW16(9, c9) FMA_ROW16(10, c10) FMA_ROW16(11, c11)
    }
    SAVE_ROW16(0, c0) SAVE_ROW16(1, c1) SAVE_ROW16(2, c2) SAVE_ROW16(3, c3) SAVE_ROW16(4, c4) SAVE_ROW16(5, c5)
    SAVE_ROW16(6, c6) SAVE_ROW16(7, c7) SAVE_ROW16(8, c8) SAVE_ROW16(9, c9) SAVE_ROW16(10, c10) SAVE_ROW16(11, c11)
}
#endif
#else
static inline void micro(const int mr, const int bf16, int64_t k, const float *x, int64_t x_stride, const void *w,
                         const void *next, float *acc) {
    (void)next;
    float b[NR];
    for (int i = 0; i < MR * NR; i++) acc[i] = 0.0f;
    for (int64_t kk = 0; kk < k; kk++) {
        for (int j = 0; j < NR; j++) {
            b[j] = bf16 ? bf16_to_float(((const uint16_t *)w)[kk * NR + j]) : ((const float *)w)[kk * NR + j];
        }
        for (int r = 0; r < mr; r++) {
            const float a = x[r * x_stride + kk];
            for (int j = 0; j < NR; j++) acc[r * NR + j] += a * b[j];
        }
    }
}
#endif

/* y[rows, :cols] (=|+=) x[rows, :k] @ w[:k, :cols] for a panel w ([k][NR], zero past cols; bfloat16 when
   bf16), next: the panel to prefetch meanwhile (or NULL). */
static void tile_gemm(int64_t rows, int64_t k, const float *x, int64_t x_stride, const void *w, int64_t cols,
                      const void *next, float *y, int64_t y_stride, const float *bias, int accumulate, int bf16) {
#ifdef TILE_ROWS /* AVX-512: tiles of 12 rows */
#define TILE TILE_ROWS
#define TILE_MICRO micro16
#else
#define TILE MR
#define TILE_MICRO micro
#endif
    float acc[TILE * NR];
    for (int64_t m0 = 0; m0 < rows; m0 += TILE) {
        const float *xm = x + m0 * x_stride;
        const int mr = (int)min64(rows - m0, TILE);
        /* a constant mr and element type per call: the unused rows and the other load compile away */
#define MICRO(n)                                                \
    if (bf16) TILE_MICRO(n, 1, k, xm, x_stride, w, next, acc); \
    else TILE_MICRO(n, 0, k, xm, x_stride, w, next, acc)
        switch (mr) {
            case 1: MICRO(1); break;
            case 2: MICRO(2); break;
            case 3: MICRO(3); break;
            case 4: MICRO(4); break;
            case 5: MICRO(5); break;
#if TILE > 6
            case 6: MICRO(6); break;
            case 7: MICRO(7); break;
            case 8: MICRO(8); break;
            case 9: MICRO(9); break;
            case 10: MICRO(10); break;
            case 11: MICRO(11); break;
#endif
            default: MICRO(TILE); break;
        }
#undef MICRO
        store_rows(acc, mr, y + m0 * y_stride, y_stride, cols, bias, accumulate);
    }
}

void ml_panel_gemm(int64_t rows, int64_t k, const float *x, int64_t x_stride, const float *w, int64_t cols,
                   const float *next, float *y, int64_t y_stride, const float *bias, int accumulate) {
    tile_gemm(rows, k, x, x_stride, w, cols, next, y, y_stride, bias, accumulate, 0);
}

void ml_linear(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const float *panels,
               int64_t out_features, const float *bias, float *y, int64_t y_stride, int64_t num_threads) {
    const int64_t num_panels = num_blocks(out_features);
    const int64_t threads = threads_for(in_features * out_features, rows, num_threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < num_panels; p++) {
        const float *w = panels + p * in_features * NR;
        const int64_t c0 = p * NR;
        tile_gemm(rows, in_features, x, x_stride, w, min64(out_features - c0, NR),
                  p + 1 < num_panels ? w + in_features * NR : NULL, y + c0, y_stride, bias ? bias + c0 : NULL, 0, 0);
    }
}

/* The first row of [0, rows) from which every row needs `need`: rows t with row_ranks[t] * k > need (all rows when
   row_ranks is NULL). Rows come ordered by rank (the runner sorts them), so those are a suffix; if they are not,
   every row is taken. */
static int64_t first_needing(const int64_t *row_ranks, int64_t rows, int64_t k, int64_t need) {
    if (!row_ranks) return 0;
    int64_t first = rows;
    while (first > 0 && row_ranks[first - 1] * k > need) first--;
    for (int64_t t = 0; t < first; t++)
        if (row_ranks[t] * k > need) return 0;
    return first;
}

/* The expand's rank chunks: [0, 16), [16, 32), [32, 64), [64, 128), ... (fixed, so that a row's sums do not
   depend on the ranks of the rows beside it) */
static inline int64_t chunk_end(int64_t lo) { return lo < NR ? NR : 2 * lo; }

/* bf16: A's and the B_m's panels are bfloat16 (else float32) */
void ml_lora_group(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const void *a_panels,
                   int64_t k, int64_t rank, int64_t r_max, const int64_t *row_ranks, const float *row_scales,
                   float scale, const int64_t *b_panels, const int64_t *c0, const int64_t *c1, float *y,
                   int64_t y_stride, float *h, int64_t num_threads, int64_t bf16) {
    const int64_t item = bf16 ? 2 : 4; /* bytes per weight */
    /* h: [rows, k * rank] (the shrink) then [k][rows, rank] (per member, masked and scaled) */
    const int64_t width = k * rank;
    float *hm = h + rows * width;
    const int64_t shrink_blocks = num_blocks(width);
    int64_t weight_floats = in_features * shrink_blocks * NR, expand_blocks = 0;
    for (int64_t m = 0; m < k; m++) {
        weight_floats += rank * (c1[m] - c0[m]);
        expand_blocks += num_blocks(c1[m] - c0[m]);
    }
    const int64_t threads = threads_for(weight_floats, rows, num_threads);
    /* fewer shrink blocks than threads (a low rank): each block's rows in `parts` runs of whole MR tiles */
    const int64_t parts = shrink_blocks < threads ? min64(threads, (rows + MR - 1) / MR) : 1;
    const int64_t part_rows = ((rows + parts - 1) / parts + MR - 1) / MR * MR;
    /* the first row each shrink block and each expand rank chunk runs for (0 unless masked), found once */
    int64_t block_first[shrink_blocks], chunk_first[64], num_chunks = 0;
    for (int64_t b = 0; b < shrink_blocks; b++) block_first[b] = first_needing(row_ranks, rows, k, b * NR);
    for (int64_t lo = 0; lo < rank; lo = chunk_end(lo))
        chunk_first[num_chunks++] = first_needing(row_ranks, rows, 1, lo);
#pragma omp parallel num_threads(threads)
    {
        /* shrink: block b (columns b*16 ..) for the rows whose rank reaches it (the others mask it to 0) */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < shrink_blocks * parts; i++) {
            const int64_t b = i / parts, r1 = min64((i % parts + 1) * part_rows, rows);
            const int64_t r0 = max64((i % parts) * part_rows, block_first[b]);
            const char *w = (const char *)a_panels + b * in_features * NR * item;
            if (r1 > r0)
                tile_gemm(r1 - r0, in_features, x + r0 * x_stride, x_stride, w, min64(width - b * NR, NR),
                          b + 1 < shrink_blocks ? w + in_features * NR * item : NULL, h + r0 * width + b * NR, width,
                          NULL, 0, (int)bf16);
        }
        /* implicit barrier; then one thread per row: mask, scale, and split the members apart */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            const int64_t keep = row_ranks ? row_ranks[t] : rank;
            const float s = row_scales ? row_scales[t] : scale;
            for (int64_t m = 0; m < k; m++)
                for (int64_t j = 0; j < rank; j++)
                    hm[(m * rows + t) * rank + j] = j < keep ? h[t * width + j * k + m] * s : 0.0f;
        }
        /* expand: per output panel, each rank chunk for the rows whose rank reaches it */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < expand_blocks; b++) {
            int64_t m = 0, panel = b; /* block b -> (member m, its panel) */
            while (panel >= num_blocks(c1[m] - c0[m])) panel -= num_blocks(c1[m] - c0[m]), m++;
            const int64_t out_m = c1[m] - c0[m], col = panel * NR;
            const char *w = (const char *)(intptr_t)b_panels[m] + panel * r_max * NR * item;
            for (int64_t c = 0, lo = 0; c < num_chunks; c++, lo = chunk_end(lo)) {
                const int64_t first = chunk_first[c], kc = min64(chunk_end(lo), rank) - lo;
                if (first < rows)
                    tile_gemm(rows - first, kc, hm + (m * rows + first) * rank + lo, rank, w + lo * NR * item,
                              min64(out_m - col, NR), lo == 0 && col + NR < out_m ? w + r_max * NR * item : NULL,
                              y + first * y_stride + c0[m] + col, y_stride, NULL, 1, (int)bf16);
            }
        }
    }
}

/* 1 when the AVX2 + FMA (+ F16C) micro-kernels are compiled in (this file's and cpu_gemm_blocks.c's), else 0 */
int ml_gemm_vectorized(void) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(ML_PORTABLE_GEMM)
    return 1;
#else
    return 0;
#endif
}
