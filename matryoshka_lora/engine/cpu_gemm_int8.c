/* The GGUF-block linears of cpu_gemm_blocks.c on int8 activations, for steps of up to MAX_INT8_ROWS rows
   (one user, a few sequences), where the CPU has AVX512-VNNI + VBMI (built with cpu_gemm.c and cpu_kernels.c).

     ml_linear_blocks_int8:  y[t, n] = sum_k x8[t, k] * W[n, k] (+ bias[n]) on the blocks' records, with x
                             quantised per block of 32 as rows_int8 states; returns 0 (and does nothing)
                             where it does not run: no VNNI, ML_NO_INT8_ROW / ML_EXACT_BLOCKS / ML_PORTABLE_GEMM,
                             or no memory for the quantised rows.

   Steps of MIN_AMX_ROWS to MAX_AMX_ROWS rows run on AMX-INT8 tiles where they run here (cpu_gemm_amx.c: the
   same quantised rows, the same bits). */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_gemm.h"

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && !defined(ML_EXACT_BLOCKS) && \
    !defined(ML_NO_INT8_ROW) && !defined(ML_PORTABLE_GEMM)
#define HAVE_INT8_ROW 1
#include <immintrin.h>

/* Rows on int8 activations (as llama.cpp's Q8_1 / Q8_0 dot products): each row's x quantised per block of 32,
       xq[t, k] = round(x[t, k] * 127 / amax_tb)      dx[t, b] = amax_tb / 127      xsum[t, b] = sum of x[t] over block b
   and each output summed with VNNI's u8 x s8 -> s32 dot products of 4, 64 weights per instruction:
       Q4_1:  y[t, n] = sum_b  d[n, b] * dx[t, b] * (sum_k q[n, k] * xq[t, k])  +  m[n, b] * xsum[t, b]
       Q8_0:  y[t, n] = sum_b  d[n, b] * dx[t, b] * (sum_k q[n, k] * (xq[t, k] + 128)  -  128 * sum_k q[n, k])
   (Q8_0's quants are signed, so x goes in as the unsigned operand, shifted by 128: xu = xq + 128). The record's
   byte order becomes VNNI's, four k of one column per 32-bit lane, with one byte permute per 64 weights,
   shared by the mr <= INT8_TILE rows of a tile; each row's sums run in the same order whatever mr, so a row's
   result does not depend on the other rows of its step. perm: 3 x 64 byte indices from int8_row_permutes;
   x8 [mr][in_features]: xq (Q4_1) or xu (Q8_0); dx, xsum [mr][num_kb]. */
#define INT8_TILE 8
static inline __attribute__((always_inline)) void rows_int8(const int mr, const int kind, int64_t num_kb,
                                                            const uint8_t *x8, int64_t x_stride, const float *dx,
                                                            const float *xsum, const uint8_t *panel,
                                                            const uint8_t *next, const uint8_t *perm, float *acc) {
    const int64_t bytes = record_bytes(kind);
    __m512 out[INT8_TILE];
    __m512i dot[INT8_TILE];
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) out[r] = _mm512_setzero_ps();
    const __m512i first = _mm512_loadu_si512(perm), second = _mm512_loadu_si512(perm + 64);
    const __m512i order = _mm512_loadu_si512(perm + 128), nibble = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < num_kb; b++) {
        const uint8_t *rec = panel + b * bytes;
        if (next)
            for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)(next + b * bytes + line), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) dot[r] = _mm512_setzero_si512();
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)rec));
        if (kind == KIND_Q4_1) {
            const uint8_t *q = rec + 2 * NR * 2;
            for (int c = 0; c < 4; c++) { /* k = 8c .. 8c + 7: low nibbles columns 0-7, high 8-15 */
                const __m512i v = _mm512_loadu_si512(q + 64 * c);
                const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                const __m512i qa = _mm512_permutex2var_epi8(lo, first, hi), qb = _mm512_permutex2var_epi8(lo, second, hi);
#pragma GCC unroll 8
                for (int r = 0; r < mr; r++) {
                    int32_t x4[2];
                    memcpy(x4, x8 + r * x_stride + b * BLOCK_K + 8 * c, sizeof x4);
                    dot[r] = _mm512_dpbusd_epi32(dot[r], qa, _mm512_set1_epi32(x4[0]));
                    dot[r] = _mm512_dpbusd_epi32(dot[r], qb, _mm512_set1_epi32(x4[1]));
                }
            }
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + NR * 2)));
#pragma GCC unroll 8
            for (int r = 0; r < mr; r++) {
                const int64_t i = r * num_kb + b;
                out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(d, _mm512_set1_ps(dx[i])), out[r]);
                out[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[i]), out[r]);
            }
        } else {
            const uint8_t *q = rec + NR * 2;
            __m512i offset = _mm512_setzero_si512();
            for (int c = 0; c < 8; c++) { /* k = 4c .. 4c + 3, 16 columns */
                const __m512i w = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(q + 64 * c));
                offset = _mm512_dpbusd_epi32(offset, _mm512_set1_epi8((char)0x80), w);
#pragma GCC unroll 8
                for (int r = 0; r < mr; r++) {
                    int32_t x4;
                    memcpy(&x4, x8 + r * x_stride + b * BLOCK_K + 4 * c, sizeof x4);
                    dot[r] = _mm512_dpbusd_epi32(dot[r], _mm512_set1_epi32(x4), w);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < mr; r++)
                out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r], offset)),
                                         _mm512_mul_ps(d, _mm512_set1_ps(dx[r * num_kb + b])), out[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) _mm512_storeu_ps(acc + r * NR, out[r]);
}

/* every row tile of one panel: y[rows, :cols] for the panel's 16 outputs */
static void tile_int8(int64_t rows, int kind, int64_t num_kb, const uint8_t *x8, int64_t x_stride, const float *dx,
                      const float *xsum, const uint8_t *panel, const uint8_t *next, const uint8_t *perm,
                      int64_t cols, float *y, int64_t y_stride, const float *bias) {
    float acc[INT8_TILE * NR];
    for (int64_t m0 = 0; m0 < rows; m0 += INT8_TILE) {
        const int mr = (int)min64(rows - m0, INT8_TILE);
        const uint8_t *xm = x8 + m0 * x_stride;
        const float *dm = dx + m0 * num_kb, *sm = xsum + m0 * num_kb;
#define ROWS(n)                                                                                   \
    if (kind == KIND_Q4_1) rows_int8(n, KIND_Q4_1, num_kb, xm, x_stride, dm, sm, panel, next, perm, acc); \
    else rows_int8(n, KIND_Q8_0, num_kb, xm, x_stride, dm, sm, panel, next, perm, acc)
        switch (mr) {
            case 1: ROWS(1); break;
            case 2: ROWS(2); break;
            case 3: ROWS(3); break;
            case 4: ROWS(4); break;
            case 5: ROWS(5); break;
            case 6: ROWS(6); break;
            case 7: ROWS(7); break;
            default: ROWS(8); break;
        }
#undef ROWS
        store_rows(acc, mr, y + m0 * y_stride, y_stride, cols, bias, 0);
    }
}

/* perm[0:64], perm[64:128]: Q4_1's lanes for k = 0-3 and 4-7 of a 64-byte chunk (k-major, 8 bytes per k,
   low nibble column j, high column j + 8) as vpermt2b indices into (low nibbles, high nibbles);
   perm[128:192]: Q8_0's chunk (k-major, 16 bytes per k) to lanes. Lane byte 4 j + t = column j, k = t. */
static void int8_row_permutes(uint8_t perm[192]) {
    for (int i = 0; i < 64; i++) {
        const int j = i / 4, t = i % 4;
        perm[i] = (uint8_t)(j < 8 ? t * 8 + j : 64 + t * 8 + j - 8);
        perm[64 + i] = (uint8_t)(perm[i] + 32);
        perm[128 + i] = (uint8_t)(t * 16 + j);
    }
}

/* one row's xq (or xu = xq + 128 for Q8_0), dx and xsum as in rows_int8's comment; xq rounded to nearest even,
   as nearbyintf does */
static void quantize_row(const float *x, int64_t num_kb, int shift, uint8_t *x8, float *dx, float *xsum) {
    const __m512i offset = _mm512_set1_epi32(shift);
    for (int64_t b = 0; b < num_kb; b++) {
        const __m512 lo = _mm512_loadu_ps(x + b * BLOCK_K), hi = _mm512_loadu_ps(x + b * BLOCK_K + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i qlo = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), offset);
        const __m512i qhi = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)), offset);
        _mm_storeu_si128((__m128i *)(x8 + b * BLOCK_K), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(x8 + b * BLOCK_K + 16), _mm512_cvtepi32_epi8(qhi));
        dx[b] = amax / 127.0f;
        xsum[b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}

int ml_linear_blocks_int8(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const uint8_t *panels,
                          int64_t kind, int64_t out_features, const float *bias, float *y, int64_t y_stride,
                          int64_t threads) {
    const int amx = rows >= MIN_AMX_ROWS && rows <= MAX_AMX_ROWS && ml_blocks_min_amx_rows();
    if (rows < 1 || (!amx && rows > MAX_INT8_ROWS)) return 0;
    const int64_t num_panels = num_blocks(out_features), num_kb = in_features / BLOCK_K;
    const int64_t panel_bytes = num_kb * record_bytes((int)kind);
    /* xq of every row, then (AMX) zero rows up to a whole tile, then dx and xsum */
    const int64_t x8_rows = amx ? (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : rows;
    uint8_t *x8 = malloc((size_t)(x8_rows * in_features + rows * num_kb * 8));
    if (!x8) return 0;
    memset(x8 + rows * in_features, 0, (size_t)((x8_rows - rows) * in_features));
    float *dx = (float *)(x8 + x8_rows * in_features), *xsum = dx + rows * num_kb;
    uint8_t perm[192];
    int8_row_permutes(perm);
    const int shift = kind == KIND_Q8_0 && !amx ? 128 : 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++)
            quantize_row(x + t * x_stride, num_kb, shift, x8 + t * in_features, dx + t * num_kb, xsum + t * num_kb);
        if (amx) { /* the same for every thread, so each meets the same worksharing loops */
            ml_amx_panels(rows, (int)kind, num_kb, x8, in_features, dx, xsum, panels, panel_bytes, num_panels, perm,
                          out_features, bias, y, y_stride);
        } else {
#pragma omp for schedule(static)
            for (int64_t p = 0; p < num_panels; p++) {
                const uint8_t *w = panels + p * panel_bytes;
                const int64_t c0 = p * NR;
                tile_int8(rows, (int)kind, num_kb, x8, in_features, dx, xsum, w,
                          p + 1 < num_panels ? w + panel_bytes : NULL, perm, min64(out_features - c0, NR), y + c0,
                          y_stride, bias ? bias + c0 : NULL);
            }
        }
    }
    free(x8);
    return 1;
}
#else
int ml_linear_blocks_int8(const float *x, int64_t x_stride, int64_t rows, int64_t in_features, const uint8_t *panels,
                          int64_t kind, int64_t out_features, const float *bias, float *y, int64_t y_stride,
                          int64_t threads) {
    (void)x, (void)x_stride, (void)rows, (void)in_features, (void)panels, (void)kind, (void)out_features;
    (void)bias, (void)y, (void)y_stride, (void)threads;
    return 0;
}
#endif

/* the most rows a step runs on int8 activations (see rows_int8 and cpu_gemm_amx.c), 0 where ml_linear_blocks_int8
   does not run */
int ml_blocks_max_int8_rows(void) {
#ifdef HAVE_INT8_ROW
    if (ml_blocks_min_amx_rows()) return MAX_AMX_ROWS;
    return MAX_INT8_ROWS;
#else
    return 0;
#endif
}
