/* What cpu_gemm.c (float32 panels), cpu_gemm_blocks.c and cpu_gemm_int8.c (GGUF block panels) share: the
   tile sizes, the block records, the threading rule and the row store. */

#ifndef ML_CPU_GEMM_H
#define ML_CPU_GEMM_H

#include <stddef.h>
#include <stdint.h>

#define NR 16 /* columns per panel */
#define MR 6  /* rows per register tile */
#define PARALLEL_MIN_WEIGHTS 16384 /* 64 KB at 16 rows: below it, waking the thread pool costs more than it saves */

/* 1 thread for a call too small to share: weights read x rows (at least 16) under PARALLEL_MIN_WEIGHTS x 16 */
static inline int64_t threads_for(int64_t weight_floats, int64_t rows, int64_t num_threads) {
    return weight_floats * (rows > 16 ? rows : 16) < (int64_t)PARALLEL_MIN_WEIGHTS * 16 ? 1 : num_threads;
}

#define BLOCK_K 32 /* GGUF's block of inputs */
#define KIND_Q4_1 0
#define KIND_Q8_0 1
#define Q4_1_BYTES (2 * NR * 2 + BLOCK_K * NR / 2) /* a record of 16 outputs x 32 inputs (cpu_gemm_blocks.c) */
#define Q8_0_BYTES (NR * 2 + BLOCK_K * NR)
#define MAX_INT8_ROWS 16 /* steps of up to this many rows run on int8 VNNI rows (bench_block_linears.py) */
#define AMX_ROWS 16      /* rows per AMX-INT8 tile (cpu_gemm_amx.c) */
#define MIN_AMX_ROWS 8   /* from this many rows the tiles beat VNNI (bench_block_linears.py) */
#define MAX_AMX_ROWS 32  /* and up to this many they beat the bf16 copy */

static inline int64_t record_bytes(int kind) { return kind == KIND_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t num_blocks(int64_t columns) { return (columns + NR - 1) / NR; } /* panels of NR */

/* y[r, :cols] = acc[r] + bias, or += acc[r] (accumulate) */
static inline void store_rows(const float *acc, int mr, float *y, int64_t y_stride, int64_t cols,
                              const float *bias, int accumulate) {
    for (int r = 0; r < mr; r++) {
        float *yr = y + r * y_stride;
        const float *a = acc + r * NR;
        if (accumulate)
            for (int64_t j = 0; j < cols; j++) yr[j] += a[j];
        else
            for (int64_t j = 0; j < cols; j++) yr[j] = a[j] + (bias ? bias[j] : 0.0f);
    }
}

/* cpu_gemm.c's float32 panel GEMM: y[rows, :cols] (=|+=) x[rows, :k] @ w[:k, :cols] for a panel w ([k][NR]) */
void ml_panel_gemm(int64_t rows, int64_t k, const float *x, int64_t x_stride, const float *w, int64_t cols,
                   const float *next, float *y, int64_t y_stride, const float *bias, int accumulate);

/* cpu_gemm_int8.c: the blocks on int8 activations for steps of up to MAX_INT8_ROWS rows (more on AMX tiles); 0
   where it does not run */
int ml_linear_blocks_int8(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const uint8_t *panels,
                          int64_t kind, int64_t out_features, const float *bias, float *y, int64_t y_stride,
                          int64_t threads);

/* cpu_gemm_amx.c: MIN_AMX_ROWS where the int8 rows run on AMX tiles here, else 0; the panels on them, called by
   every thread of a parallel region */
int ml_blocks_min_amx_rows(void);
void ml_amx_panels(int64_t rows, int kind, int64_t num_kb, const uint8_t *x8, int64_t x_stride, const float *dx,
                   const float *xsum, const uint8_t *panels, int64_t panel_bytes, int64_t num_panels,
                   const uint8_t *perm, int64_t out_features, const float *bias, float *y, int64_t y_stride);

#endif
