/* The int8 rows of cpu_gemm_int8.c on AMX-INT8 tiles, for steps of MIN_AMX_ROWS to MAX_AMX_ROWS rows (built
   with cpu_gemm.c, cpu_gemm_blocks.c and cpu_gemm_int8.c).

     ml_blocks_min_amx_rows:  MIN_AMX_ROWS where the CPU has AMX-INT8 tiles and Linux grants them to the
                              process (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), else 0
     ml_amx_panels:           y[rows, :out_features] on the blocks' panels from the quantised rows (x8, dx, xsum
                              as cpu_gemm_int8.c's rows_int8 states them, xq unshifted, x8 readable for whole
                              16-row tiles); called by every thread of an OpenMP parallel region, it shares
                              the panels among them (an orphaned `omp for`)

   Each block's int32 dot products of 16 rows come from one tile multiply instead of VNNI's 8 per row: the
   same integers, then the same float sums in the same order, so both give the same bits (tested). */

#include <string.h>

#include "cpu_gemm.h"

#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && \
    !defined(ML_NO_AMX) && !defined(ML_EXACT_BLOCKS) && !defined(ML_NO_INT8_ROW) && !defined(ML_PORTABLE_GEMM)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 once Linux lets this process use the tile registers (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), else 0;
   asked once, from the calling thread (the grant is per process) */
static int amx_permitted(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
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

/* rows_int8's sums (cpu_gemm_int8.c) for mr <= 16 rows of one panel, each block's dots as one tile multiply:
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

int ml_blocks_min_amx_rows(void) { return amx_permitted() ? MIN_AMX_ROWS : 0; }

void ml_amx_panels(int64_t rows, int kind, int64_t num_kb, const uint8_t *x8, int64_t x_stride, const float *dx,
                   const float *xsum, const uint8_t *panels, int64_t panel_bytes, int64_t num_panels,
                   const uint8_t *perm, int64_t out_features, const float *bias, float *y, int64_t y_stride) {
    configure_tiles();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < num_panels; p++) {
        const uint8_t *w = panels + p * panel_bytes;
        const int64_t c0 = p * NR;
        tile_amx(rows, kind, num_kb, x8, x_stride, dx, xsum, w, p + 1 < num_panels ? w + panel_bytes : NULL, perm,
                 min64(out_features - c0, NR), y + c0, y_stride, bias ? bias + c0 : NULL);
    }
    _tile_release();
}
#else
int ml_blocks_min_amx_rows(void) { return 0; }

void ml_amx_panels(int64_t rows, int kind, int64_t num_kb, const uint8_t *x8, int64_t x_stride, const float *dx,
                   const float *xsum, const uint8_t *panels, int64_t panel_bytes, int64_t num_panels,
                   const uint8_t *perm, int64_t out_features, const float *bias, float *y, int64_t y_stride) {
    (void)rows, (void)kind, (void)num_kb, (void)x8, (void)x_stride, (void)dx, (void)xsum, (void)panels;
    (void)panel_bytes, (void)num_panels, (void)perm, (void)out_features, (void)bias, (void)y, (void)y_stride;
}
#endif
