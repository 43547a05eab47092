/* The GGUF-block linears of cpu_gemm_blocks.c on int8 activations, for steps of up to MAX_INT8_ROWS rows
   (one user, a few sequences), where the CPU has AVX512-VNNI + VBMI (built with cpu_gemm.c and cpu_kernels.c).

     ml_linear_blocks_int8:  y[t, n] = sum_k x8[t, k] * W[n, k] (+ bias[n]) on the blocks' records, with x
                             quantised per block of 32 as rows_int8 states; returns 0 (and does nothing)
                             where it does not run: no VNNI, ML_NO_INT8_ROW / ML_EXACT_BLOCKS / ML_PORTABLE_GEMM,
                             or no memory for the quantised rows.

   From MIN_AMX_ROWS rows, where the CPU has AMX-INT8 tiles and Linux grants them to the process, each
   block's int32 dot products of every row come from one tile multiply (rows_amx) instead of VNNI's 8 per
   row: the same integers, then the same float sums in the same order, so both give the same bits. */

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
#define AMX_ROWS 16 /* rows per AMX tile (rows_amx) */
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

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && !defined(ML_NO_AMX)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define MIN_AMX_ROWS 8  /* from this many rows the tiles beat VNNI (bench_block_linears.py) */
#define MAX_AMX_ROWS 32 /* and up to this many they beat the bf16 copy */

/* 1 once Linux lets this process use the tile registers (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), else 0;
   asked once, from the calling thread (the grant is per process) */
static int amx_permitted(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return state;
}

/* palette 1, four blocks in flight: tmm0-3 = C [16][16] int32 (blocks b .. b + 3), tmm4-5 = A [16][32] int8 (a
   block of xq of 16 rows), tmm6-7 = B [8][64] (a block's 32 x 16 quants in VNNI order: row i, byte 4 j + t =
   column j, k = 4 i + t) */
static void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = t < 6 ? AMX_ROWS : BLOCK_K / 4;
        config.colsb[t] = t >= 4 && t < 6 ? BLOCK_K : NR * 4;
    }
    _tile_loadconfig(&config);
}

/* a record's 32 x 16 quants in VNNI order (the layout of rows_int8's permuted vectors), 512 bytes */
static inline __attribute__((always_inline)) void unpack_quants(const int kind, const uint8_t *rec, __m512i first,
                                                                __m512i second, __m512i order, uint8_t *quants) {
    if (kind == KIND_Q4_1) {
        const uint8_t *q = rec + 2 * NR * 2;
        const __m512i nibble = _mm512_set1_epi8(0x0F);
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(q + 64 * c);
            const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            _mm512_store_si512(quants + 128 * c, _mm512_permutex2var_epi8(lo, first, hi));
            _mm512_store_si512(quants + 128 * c + 64, _mm512_permutex2var_epi8(lo, second, hi));
        }
    } else {
        const uint8_t *q = rec + NR * 2;
        for (int c = 0; c < 8; c++)
            _mm512_store_si512(quants + 64 * c, _mm512_permutexvar_epi8(order, _mm512_loadu_si512(q + 64 * c)));
    }
}

/* C tile c += A (xq of block b) x B (quants): signed x unsigned for Q4_1, signed x signed for Q8_0 */
#define TILE_DOTS(c, a, w, kind, xq, x_stride, quants) \
    do {                                               \
        _tile_loadd(a, xq, x_stride);                  \
        _tile_loadd(w, quants, NR * 4);                \
        if (kind == KIND_Q4_1) _tile_dpbsud(c, a, w);  \
        else _tile_dpbssd(c, a, w);                    \
    } while (0)

/* out[r] += the block's dots of row r, scaled as rows_int8 scales them */
static inline __attribute__((always_inline)) void scale_dots(const int mr, const int kind, const uint8_t *rec,
                                                             const int32_t *dots, const float *dx, const float *xsum,
                                                             int64_t num_kb, __m512 *out) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)rec));
    const __m512 m = kind == KIND_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + NR * 2)))
                                       : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < mr; r++) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots + r * NR));
        out[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx[r * num_kb])), out[r]);
        if (kind == KIND_Q4_1) out[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * num_kb]), out[r]);
    }
}

/* rows_int8's sums for mr <= 16 rows of one panel, each block's dots as one tile multiply:
       C[t, j] = sum_k xq[t, k] * q[j, k]     (Q4_1: signed x unsigned, Q8_0: signed x signed; exact in int32)
   then, per row and block in order, the float sums of rows_int8 (Q8_0 needs no +128 shift: the tiles take
   signed x). Four blocks' multiplies are issued before their results are read, so the tiles' latency
   overlaps. x8 holds xq, readable for 16 rows (a tile loads them all; rows past mr are not used). */
static inline __attribute__((always_inline)) void rows_amx(const int mr, const int kind, int64_t num_kb,
                                                           const uint8_t *x8, int64_t x_stride, const float *dx,
                                                           const float *xsum, const uint8_t *panel,
                                                           const uint8_t *next, const uint8_t *perm, float *acc) {
    const int64_t bytes = record_bytes(kind);
    __attribute__((aligned(64))) uint8_t quants[4][BLOCK_K * NR];
    __attribute__((aligned(64))) int32_t dots[4][AMX_ROWS * NR];
    __m512 out[AMX_ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < mr; r++) out[r] = _mm512_setzero_ps();
    const __m512i first = _mm512_loadu_si512(perm), second = _mm512_loadu_si512(perm + 64);
    const __m512i order = _mm512_loadu_si512(perm + 128);
    int64_t b = 0;
    for (; b + 4 <= num_kb; b += 4) {
        for (int i = 0; i < 4; i++) {
            const uint8_t *rec = panel + (b + i) * bytes;
            if (next)
                for (int64_t line = 0; line < bytes; line += 64)
                    _mm_prefetch((const char *)(next + (b + i) * bytes + line), _MM_HINT_T0);
            unpack_quants(kind, rec, first, second, order, quants[i]);
        }
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        TILE_DOTS(0, 4, 6, kind, x8 + b * BLOCK_K, x_stride, quants[0]);
        TILE_DOTS(1, 5, 7, kind, x8 + (b + 1) * BLOCK_K, x_stride, quants[1]);
        TILE_DOTS(2, 4, 6, kind, x8 + (b + 2) * BLOCK_K, x_stride, quants[2]);
        TILE_DOTS(3, 5, 7, kind, x8 + (b + 3) * BLOCK_K, x_stride, quants[3]);
        _tile_stored(0, dots[0], NR * 4);
        _tile_stored(1, dots[1], NR * 4);
        _tile_stored(2, dots[2], NR * 4);
        _tile_stored(3, dots[3], NR * 4);
        for (int i = 0; i < 4; i++)
            scale_dots(mr, kind, panel + (b + i) * bytes, dots[i], dx + b + i, xsum + b + i, num_kb, out);
    }
    for (; b < num_kb; b++) { /* the last num_kb % 4 blocks, one at a time */
        const uint8_t *rec = panel + b * bytes;
        if (next)
            for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)(next + b * bytes + line), _MM_HINT_T0);
        unpack_quants(kind, rec, first, second, order, quants[0]);
        _tile_zero(0);
        TILE_DOTS(0, 4, 6, kind, x8 + b * BLOCK_K, x_stride, quants[0]);
        _tile_stored(0, dots[0], NR * 4);
        scale_dots(mr, kind, rec, dots[0], dx + b, xsum + b, num_kb, out);
    }
#pragma GCC unroll 16
    for (int r = 0; r < mr; r++) _mm512_storeu_ps(acc + r * NR, out[r]);
}

/* every 16-row tile of one panel (the tiles configured by configure_tiles): y[rows, :cols] */
static void tile_amx(int64_t rows, int kind, int64_t num_kb, const uint8_t *x8, int64_t x_stride, const float *dx,
                     const float *xsum, const uint8_t *panel, const uint8_t *next, const uint8_t *perm, int64_t cols,
                     float *y, int64_t y_stride, const float *bias) {
    float acc[AMX_ROWS * NR];
    for (int64_t m0 = 0; m0 < rows; m0 += AMX_ROWS) {
        const int mr = (int)min64(rows - m0, AMX_ROWS);
        const uint8_t *xm = x8 + m0 * x_stride;
        const float *dm = dx + m0 * num_kb, *sm = xsum + m0 * num_kb;
#define ROWS(n)                                                                                          \
    case n:                                                                                              \
        if (kind == KIND_Q4_1) rows_amx(n, KIND_Q4_1, num_kb, xm, x_stride, dm, sm, panel, next, perm, acc); \
        else rows_amx(n, KIND_Q8_0, num_kb, xm, x_stride, dm, sm, panel, next, perm, acc);                \
        break
        switch (mr) {
            ROWS(1); ROWS(2); ROWS(3); ROWS(4); ROWS(5); ROWS(6); ROWS(7); ROWS(8); ROWS(9); ROWS(10); ROWS(11);
            ROWS(12); ROWS(13); ROWS(14); ROWS(15); ROWS(16);
        }
#undef ROWS
        store_rows(acc, mr, y + m0 * y_stride, y_stride, cols, bias, 0);
    }
}
#endif

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
#ifdef HAVE_AMX
    const int amx = rows >= MIN_AMX_ROWS && rows <= MAX_AMX_ROWS && amx_permitted();
#else
    const int amx = 0;
#endif
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
#define QUANTIZE_ROWS                                                                                          \
    _Pragma("omp for schedule(static)") for (int64_t t = 0; t < rows; t++)                                     \
        quantize_row(x + t * x_stride, num_kb, shift, x8 + t * in_features, dx + t * num_kb, xsum + t * num_kb)
#ifdef HAVE_AMX
    if (amx) {
#pragma omp parallel num_threads(threads)
        {
            QUANTIZE_ROWS;
            configure_tiles();
#pragma omp for schedule(static)
            for (int64_t p = 0; p < num_panels; p++) {
                const uint8_t *w = panels + p * panel_bytes;
                const int64_t c0 = p * NR;
                tile_amx(rows, (int)kind, num_kb, x8, in_features, dx, xsum, w,
                         p + 1 < num_panels ? w + panel_bytes : NULL, perm, min64(out_features - c0, NR), y + c0,
                         y_stride, bias ? bias + c0 : NULL);
            }
            _tile_release();
        }
        free(x8);
        return 1;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        QUANTIZE_ROWS;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < num_panels; p++) {
            const uint8_t *w = panels + p * panel_bytes;
            const int64_t c0 = p * NR;
            tile_int8(rows, (int)kind, num_kb, x8, in_features, dx, xsum, w,
                      p + 1 < num_panels ? w + panel_bytes : NULL, perm, min64(out_features - c0, NR), y + c0,
                      y_stride, bias ? bias + c0 : NULL);
        }
    }
#undef QUANTIZE_ROWS
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

/* the most rows a step runs on int8 activations (see rows_int8 and rows_amx), 0 where ml_linear_blocks_int8 does
   not run */
int ml_blocks_max_int8_rows(void) {
#ifdef HAVE_AMX
    if (amx_permitted()) return MAX_AMX_ROWS;
#endif
#ifdef HAVE_INT8_ROW
    return MAX_INT8_ROWS;
#else
    return 0;
#endif
}

/* the fewest rows a step runs on AMX tiles (see rows_amx), 0 where it does not: no AMX-INT8, ML_NO_AMX, or no
   grant of the tile registers from the kernel */
int ml_blocks_min_amx_rows(void) {
#ifdef HAVE_AMX
    return amx_permitted() ? MIN_AMX_ROWS : 0;
#else
    return 0;
#endif
}
