/* The model's linears computed on GGUF's own quantised blocks (built with cpu_gemm.c and cpu_kernels.c).

     ml_linear_blocks:  y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),  W decoded from its blocks of 32 along k:
                            Q4_1:  W[n, k] = d[n, b] * q[n, k] + m[n, b]     q in 0..15     b = k / 32
                            Q8_0:  W[n, k] = d[n, b] * q[n, k]               q in -127..127

   d and m are the file's float16 values, so each decoded weight d * q (+ m) is exactly the float32 value
   the GGUF dequantiser (and so the engine's float32 path) computes: d * q is exact in float32 and the one
   rounding is the add, which an FMA does the same way. From 2 rows up the sum runs over k in the same
   order as cpu_gemm.c's float32 kernel, one accumulator per output, so both give the same bits. Where the
   CPU has AVX512-VNNI, steps of up to MAX_INT8_ROWS rows (one user, a few sequences; more on AMX-INT8 tiles)
   instead run on x quantised to int8 per block, as llama.cpp does (cpu_gemm_int8.c; ~0.5 % relative error on random data): the
   dot products of each block in int32, scaled once, sum_b d_b dx_b (xq_b . q_b) + m_b sum(x_b). Otherwise
   one row sums each block's x . q first in float (two FMAs per 16 weights fewer than decoding, equal to
   float rounding).

   Layout (cpu_linear.pack_blocks): outputs in panels of NR = 16, each k-major, one record per block of 32:
       Q4_1 record (320 B): f16 d[16], f16 m[16], uint8 q[32][8]   q[kk][j] = q(col j) | q(col j + 8) << 4
       Q8_0 record (544 B): f16 d[16], int8 q[32][16]
   so a step reads 5 (Q4_1) or 8.5 (Q8_0) bits per weight, as the file does, instead of float32's 32.
   Columns past out_features are zero (d = m = q = 0). Up to MR = 6 rows, each k's 16 weights are decoded
   once into two AVX2 vectors and used for every row; more rows decode each panel once into a float32
   scratch panel for cpu_gemm.c's micro-kernel. Threads split the panels as in cpu_gemm.c.

   Without AVX2 + FMA + F16C (or with ML_PORTABLE_GEMM) plain C loops decode and multiply the same way;
   ML_EXACT_BLOCKS keeps the one-row case on the bit-exact path (tests compare the two). */

#include <stdlib.h>
#include <string.h>

#include "cpu_gemm.h"
#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(ML_PORTABLE_GEMM)
#include <immintrin.h>

static inline __m256 load_h8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* q0, q1 = the 16 quants of step kk of a record, as floats (columns 0-7, 8-15) */
static inline __attribute__((always_inline)) void quants(const int kind, const uint8_t *rec, int64_t kk, __m256 *q0,
                                                         __m256 *q1) {
    if (kind == KIND_Q4_1) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(rec + 2 * NR * 2 + kk * NR / 2)));
        *q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0F)));
        *q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)(rec + NR * 2 + kk * NR));
        *q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        *q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
    }
}

/* w0, w1 = the 16 weights of step kk decoded (d * q + m; Q8_0: d * q), given the record's d and m vectors */
static inline __attribute__((always_inline)) void weights(const int kind, const uint8_t *rec, int64_t kk, __m256 d0,
                                                          __m256 d1, __m256 m0, __m256 m1, __m256 *w0, __m256 *w1) {
    __m256 q0, q1;
    quants(kind, rec, kk, &q0, &q1);
    *w0 = kind == KIND_Q4_1 ? _mm256_fmadd_ps(q0, d0, m0) : _mm256_mul_ps(q0, d0);
    *w1 = kind == KIND_Q4_1 ? _mm256_fmadd_ps(q1, d1, m1) : _mm256_mul_ps(q1, d1);
}

/* d0, d1, m0, m1 of a record (m zero for Q8_0) */
static inline __attribute__((always_inline)) void scales(const int kind, const uint8_t *rec, __m256 *d0, __m256 *d1,
                                                         __m256 *m0, __m256 *m1) {
    const uint16_t *d = (const uint16_t *)rec;
    *d0 = load_h8(d), *d1 = load_h8(d + 8);
    *m0 = kind == KIND_Q4_1 ? load_h8(d + 16) : _mm256_setzero_ps();
    *m1 = kind == KIND_Q4_1 ? load_h8(d + 24) : _mm256_setzero_ps();
}

#define FMA_ROW(r, lo, hi)                                            \
    if (mr > r) {                                                    \
        const __m256 a = _mm256_broadcast_ss(x + r * x_stride + kx); \
        lo = _mm256_fmadd_ps(a, w0, lo);                             \
        hi = _mm256_fmadd_ps(a, w1, hi);                             \
    }
#define SAVE_ROW(r, lo, hi)                      \
    if (mr > r) {                               \
        _mm256_storeu_ps(acc + r * NR, lo);     \
        _mm256_storeu_ps(acc + r * NR + 8, hi); \
    }

/* acc[mr, 16] = x[mr, :32 * num_kb] @ W[:, panel]^T, decoding the panel's records; prefetches `next`. */
static inline __attribute__((always_inline)) void micro(const int mr, const int kind, int64_t num_kb, const float *x,
                                                        int64_t x_stride, const uint8_t *panel, const uint8_t *next,
                                                        float *acc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int64_t bytes = record_bytes(kind);
    for (int64_t b = 0; b < num_kb; b++) {
        const uint8_t *rec = panel + b * bytes;
        __m256 d0, d1, m0, m1, w0, w1;
        scales(kind, rec, &d0, &d1, &m0, &m1);
        if (next)
            for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)(next + b * bytes + line), _MM_HINT_T0);
        for (int64_t kk = 0; kk < BLOCK_K; kk++) {
            weights(kind, rec, kk, d0, d1, m0, m1, &w0, &w1);
            const int64_t kx = b * BLOCK_K + kk;
            FMA_ROW(0, c00, c01) FMA_ROW(1, c10, c11) FMA_ROW(2, c20, c21)
            FMA_ROW(3, c30, c31) FMA_ROW(4, c40, c41) FMA_ROW(5, c50, c51)
        }
    }
    SAVE_ROW(0, c00, c01) SAVE_ROW(1, c10, c11) SAVE_ROW(2, c20, c21)
    SAVE_ROW(3, c30, c31) SAVE_ROW(4, c40, c41) SAVE_ROW(5, c50, c51)
}
/* One row (a single sequence's decode): y[:16] = sum over blocks of d * (x . q) (+ m * sum(x)), each block's
   x . q summed apart first. That skips decoding each weight to d * q + m (two FMAs per 16 weights fewer,
   which bound the one-row case), at the cost of summing in another order than the float32 kernel:
   equal to float rounding, not bit for bit. xsum[b]: sum of x over block b (Q4_1 only). */
static void one_row(const int kind, int64_t num_kb, const float *x, const float *xsum, const uint8_t *panel,
                    const uint8_t *next, float *acc) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    const int64_t bytes = record_bytes(kind);
    for (int64_t b = 0; b < num_kb; b++) {
        const uint8_t *rec = panel + b * bytes;
        const float *xb = x + b * BLOCK_K;
        if (next)
            for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)(next + b * bytes + line), _MM_HINT_T0);
        __m256 blo = _mm256_setzero_ps(), bhi = blo, q0, q1, d0, d1, m0, m1;
        for (int64_t kk = 0; kk < BLOCK_K; kk++) {
            quants(kind, rec, kk, &q0, &q1);
            const __m256 a = _mm256_broadcast_ss(xb + kk);
            blo = _mm256_fmadd_ps(a, q0, blo);
            bhi = _mm256_fmadd_ps(a, q1, bhi);
        }
        scales(kind, rec, &d0, &d1, &m0, &m1);
        lo = _mm256_fmadd_ps(blo, d0, lo);
        hi = _mm256_fmadd_ps(bhi, d1, hi);
        if (kind == KIND_Q4_1) {
            const __m256 xs = _mm256_broadcast_ss(xsum + b);
            lo = _mm256_fmadd_ps(xs, m0, lo);
            hi = _mm256_fmadd_ps(xs, m1, hi);
        }
    }
    _mm256_storeu_ps(acc, lo);
    _mm256_storeu_ps(acc + 8, hi);
}
#ifndef ML_EXACT_BLOCKS
#define HAVE_ONE_ROW 1
#endif

/* out[k][16] = the panel's weights decoded to float32 (cpu_gemm.c's panel layout) */
static void decode_panel(const int kind, int64_t num_kb, const uint8_t *panel, float *out) {
    const int64_t bytes = record_bytes(kind);
    for (int64_t b = 0; b < num_kb; b++) {
        const uint8_t *rec = panel + b * bytes;
        float *o = out + b * BLOCK_K * NR;
        __m256 d0, d1, m0, m1, w0, w1;
        scales(kind, rec, &d0, &d1, &m0, &m1);
        for (int64_t kk = 0; kk < BLOCK_K; kk++) {
            weights(kind, rec, kk, d0, d1, m0, m1, &w0, &w1);
            _mm256_storeu_ps(o + kk * NR, w0);
            _mm256_storeu_ps(o + kk * NR + 8, w1);
        }
    }
}
#else
/* IEEE float16 bits -> float (the file's d and m: finite) */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = (float)mant * 5.9604644775390625e-08f; /* subnormal: mant * 2^-24 */
    } else {
        const uint32_t bits = ((exp + 112) << 23) | (mant << 13);
        memcpy(&f, &bits, sizeof f);
    }
    return sign ? -f : f;
}

/* decoded weight of column j at step kk of one record */
static inline float decode(int kind, const uint8_t *rec, int64_t kk, int j) {
    const uint16_t *d = (const uint16_t *)rec;
    if (kind == KIND_Q4_1) {
        const uint8_t byte = rec[2 * NR * 2 + kk * NR / 2 + (j & 7)];
        const float q = (float)(j < 8 ? byte & 0x0F : byte >> 4);
        return half_to_float(d[j]) * q + half_to_float(d[NR + j]);
    }
    return half_to_float(d[j]) * (float)((const int8_t *)(rec + NR * 2))[kk * NR + j];
}

static inline void micro(const int mr, const int kind, int64_t num_kb, const float *x, int64_t x_stride,
                         const uint8_t *panel, const uint8_t *next, float *acc) {
    (void)next;
    float w[NR];
    for (int i = 0; i < MR * NR; i++) acc[i] = 0.0f;
    for (int64_t b = 0; b < num_kb; b++)
        for (int64_t kk = 0; kk < BLOCK_K; kk++) {
            for (int j = 0; j < NR; j++) w[j] = decode(kind, panel + b * record_bytes(kind), kk, j);
            for (int r = 0; r < mr; r++) {
                const float a = x[r * x_stride + b * BLOCK_K + kk];
                for (int j = 0; j < NR; j++) acc[r * NR + j] += a * w[j];
            }
        }
}

static void decode_panel(const int kind, int64_t num_kb, const uint8_t *panel, float *out) {
    for (int64_t b = 0; b < num_kb; b++)
        for (int64_t kk = 0; kk < BLOCK_K; kk++)
            for (int j = 0; j < NR; j++)
                out[(b * BLOCK_K + kk) * NR + j] = decode(kind, panel + b * record_bytes(kind), kk, j);
}
#endif


static void tile_blocks(int64_t rows, int kind, int64_t num_kb, const float *x, int64_t x_stride, const uint8_t *panel,
                        int64_t cols, const uint8_t *next, float *y, int64_t y_stride, const float *bias) {
    float acc[MR * NR];
    for (int64_t m0 = 0; m0 < rows; m0 += MR) {
        const float *xm = x + m0 * x_stride;
        const int mr = (int)min64(rows - m0, MR);
        /* constant mr and kind per call: the unused rows and the other decoder compile away */
#define MICRO(n)                                                                       \
    if (kind == KIND_Q4_1) micro(n, KIND_Q4_1, num_kb, xm, x_stride, panel, next, acc); \
    else micro(n, KIND_Q8_0, num_kb, xm, x_stride, panel, next, acc)
        switch (mr) {
            case 1: MICRO(1); break;
            case 2: MICRO(2); break;
            case 3: MICRO(3); break;
            case 4: MICRO(4); break;
            case 5: MICRO(5); break;
            default: MICRO(6); break;
        }
#undef MICRO
        store_rows(acc, mr, y + m0 * y_stride, y_stride, cols, bias, 0);
    }
}

/* kind: 0 = Q4_1, 1 = Q8_0; in_features a multiple of 32; panels as in the header comment.
   Up to MR rows (decode of a few sequences): one register tile, each weight decoded in registers as it is
   used. More rows: each panel is decoded once into a float32 scratch panel (in L2) and cpu_gemm.c's
   float32 micro-kernel runs every row tile on it, so the decode is not repeated per row tile. Both sum
   in the same order as the float32 kernel. */
void ml_linear_blocks(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const uint8_t *panels,
                      int64_t kind, int64_t out_features, const float *bias, float *y, int64_t y_stride,
                      int64_t num_threads) {
    const int64_t num_panels = num_blocks(out_features), num_kb = in_features / BLOCK_K;
    const int64_t panel_bytes = num_kb * record_bytes((int)kind);
    /* weight bytes / 4: the float32 count threads_for is written in */
    const int64_t threads = threads_for(num_panels * panel_bytes / 4, rows, num_threads);
    if (ml_linear_blocks_int8(x, x_stride, rows, in_features, panels, kind, out_features, bias, y, y_stride, threads))
        return;
#ifdef HAVE_ONE_ROW
    if (rows == 1) {
        float xsum[in_features / BLOCK_K + 1];
        for (int64_t b = 0; b < num_kb; b++) {
            float sum = 0.0f;
            for (int64_t kk = 0; kk < BLOCK_K; kk++) sum += x[b * BLOCK_K + kk];
            xsum[b] = sum;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < num_panels; p++) {
            float acc[NR];
            const uint8_t *w = panels + p * panel_bytes;
            const int64_t c0 = p * NR;
            one_row((int)kind, num_kb, x, xsum, w, p + 1 < num_panels ? w + panel_bytes : NULL, acc);
            store_rows(acc, 1, y + c0, y_stride, min64(out_features - c0, NR), bias ? bias + c0 : NULL, 0);
        }
        return;
    }
#endif
    if (rows <= MR) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < num_panels; p++) {
            const uint8_t *w = panels + p * panel_bytes;
            const int64_t c0 = p * NR;
            tile_blocks(rows, (int)kind, num_kb, x, x_stride, w, min64(out_features - c0, NR),
                        p + 1 < num_panels ? w + panel_bytes : NULL, y + c0, y_stride, bias ? bias + c0 : NULL);
        }
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc((size_t)in_features * NR * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < num_panels; p++) {
            const int64_t c0 = p * NR;
            if (scratch) {
                decode_panel((int)kind, num_kb, panels + p * panel_bytes, scratch);
                ml_panel_gemm(rows, in_features, x, x_stride, scratch, min64(out_features - c0, NR), NULL, y + c0,
                              y_stride, bias ? bias + c0 : NULL, 0);
            } else { /* no memory for the scratch panel: decode in registers, per row tile */
                tile_blocks(rows, (int)kind, num_kb, x, x_stride, panels + p * panel_bytes,
                            min64(out_features - c0, NR), NULL, y + c0, y_stride, bias ? bias + c0 : NULL);
            }
        }
        free(scratch);
    }
}
