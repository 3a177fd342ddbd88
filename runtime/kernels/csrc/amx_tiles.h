/* The AMX tile core of amx_linear_cpu.c, shared with dense_matmul.h (included, not built on
 * its own): one unit of 32 output columns of the packed bf16 weight (amx_linear_cpu.c describes
 * the layout) against up to 32 activation rows on the tile unit, and the bias-and-round store.
 * Everything carries its own target attributes; the caller checks the CPU has AMX and that
 * Linux granted the tile state (fornax_amx_init) before calling.
 */
#ifndef FORNAX_AMX_TILES_H
#define FORNAX_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define BLOCK_ELEMS 512     /* one B tile: 16 rows x 32 bf16 */
#define PREFETCH_BYTES 8192 /* how far ahead of the tile loads the weight stream is fetched */

/* Fetch the 2 KiB of weights PREFETCH_BYTES ahead: a thread's units are one contiguous run, so
 * this also runs into its next unit. The tile loads alone wait on memory every step. */
static inline void prefetch_ahead(const uint16_t *b) {
    const char *p = (const char *)b + PREFETCH_BYTES;
    for (int line = 0; line < 2 * BLOCK_ELEMS * 2; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Write `rows` rows of a 32-column fp32 result block (stride 32) as bf16, adding the bias. */
FORNAX_AVX512
static void write_block(const float *acc, int rows, uint16_t *y, int64_t y_stride, int64_t col0,
                        int64_t n, const float *bias32) {
    const int valid = n - col0 < 32 ? (int)(n - col0) : 32;
    const __mmask16 m0 = tail_mask16(valid), m1 = tail_mask16(valid - 16);
    __m512 b0 = _mm512_loadu_ps(bias32), b1 = _mm512_loadu_ps(bias32 + 16);
    for (int r = 0; r < rows; r++) {
        uint16_t *dst = y + r * y_stride + col0;
        bf16x16_store(dst, _mm512_add_ps(_mm512_loadu_ps(acc + r * 32), b0), m0);
        if (m1) bf16x16_store(dst + 16, _mm512_add_ps(_mm512_loadu_ps(acc + r * 32 + 16), b1), m1);
    }
}

__attribute__((target("amx-tile,amx-bf16"))) static void configure_tiles(int rows0, int rows1) {
    tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    /* tiles 0,1: x rows (A); 2,3: weight halves (B); 4,5: rows0 x halves; 6,7: rows1 x halves */
    int rows[8] = {rows0, rows1, 16, 16, rows0, rows0, rows1, rows1};
    for (int t = 0; t < 8; t++) {
        if (rows[t] > 0) {
            cfg.rows[t] = (uint8_t)rows[t];
            cfg.colsb[t] = 64;
        }
    }
    _tile_loadconfig(&cfg);
}

/* One unit (32 columns) for up to 32 rows of x starting at x_rows (two_tiles: rows 16-31 as a
 * second A tile; a constant at each call, so each call site compiles to its own loop); acc gets
 * [rows][32] fp32. Not always_inline: GCC 12 then drops prefetch_ahead's prefetches (10% slower
 * at 32 rows). */
__attribute__((target("amx-tile,amx-bf16"))) static inline void
unit_tiles(const uint16_t *x_rows, int64_t x_stride, const uint16_t *unit, int kb_count, float *acc,
           const int two_tiles) {
    _tile_zero(4);
    _tile_zero(5);
    if (two_tiles) {
        _tile_zero(6);
        _tile_zero(7);
    }
    const int64_t xs_bytes = x_stride * 2;
    for (int kb = 0; kb < kb_count; kb++) {
        const uint16_t *b = unit + (int64_t)kb * 2 * BLOCK_ELEMS;
        prefetch_ahead(b);
        _tile_loadd(0, x_rows + kb * 32, xs_bytes);
        if (two_tiles) _tile_loadd(1, x_rows + 16 * x_stride + kb * 32, xs_bytes);
        _tile_loadd(2, b, 64);
        _tile_loadd(3, b + BLOCK_ELEMS, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        if (two_tiles) {
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
    }
    _tile_stored(4, acc, 128);
    _tile_stored(5, acc + 16, 128);
    if (two_tiles) {
        _tile_stored(6, acc + 16 * 32, 128);
        _tile_stored(7, acc + 16 * 32 + 16, 128);
    }
}
#endif
