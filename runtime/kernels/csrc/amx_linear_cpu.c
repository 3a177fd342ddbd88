/* y = x @ W^T (+ b) in bf16 with Intel AMX tiles, W pre-packed for the tile unit.
 *
 * Decode-sized batches (a few to a few dozen rows) make a linear layer a stream over its weight:
 * every weight byte is used by only M rows. oneDNN's bf16 path streams weights at a fraction of
 * memory bandwidth there; this kernel reads each packed weight exactly once, in order, and does
 * the arithmetic on the tile unit (TDPBF16PS, fp32 accumulation), so it runs at the speed of the
 * weight read.
 *
 * Packed layout (see cpu_amx_linear.py): N is padded to a multiple of 32 and cut into units of
 * 32 output columns; a unit holds, for each block of 32 k, two 16-column B tiles of 16 rows x
 * (16 columns x 2 k) bf16 = 1 KiB each, i.e. packed[unit][kb][half][k/2][col][k%2]. Threads split
 * the units; each unit's stream is one contiguous run. Rows of x are taken 32 at a time (two A
 * tiles), so larger M re-reads the unit from cache, not memory.
 *
 * Build: plain -march=native code; the AMX parts carry target attributes, so the file builds on
 * any x86-64 compiler that knows AMX and the caller checks the CPU (and asks the kernel for tile
 * state with fornax_amx_init) before use.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
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

/* Ask Linux for the AMX tile state for this process; 0 when granted. */
int fornax_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

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

/* y[M, N] (row stride y_stride) = x[M, K] (row stride x_stride) @ W^T + bias (nullable), bf16.
 * packed: from the layout above with N padded to a multiple of 32; K a multiple of 32.
 * Returns 0, or -1 for shapes the kernel does not take. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw"))) int
fornax_amx_linear_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *packed,
                       const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t m, int64_t n,
                       int64_t k, int num_threads) {
    if (m <= 0 || n <= 0 || k <= 0 || k % 32) return -1;
    const int64_t units = (n + 31) / 32;
    const int kb_count = (int)(k / 32);
    const int64_t unit_elems = (int64_t)kb_count * 2 * BLOCK_ELEMS;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > units) num_threads = (int)units;
#pragma omp parallel num_threads(num_threads)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        int64_t u_begin = units * tid / nth, u_end = units * (tid + 1) / nth;
        float acc[32 * 32] __attribute__((aligned(64)));
        float bias32[32] __attribute__((aligned(64)));
        int configured = -1;
        for (int64_t u = u_begin; u < u_end; u++) {
            const uint16_t *unit = packed + u * unit_elems;
            const int64_t col0 = u * 32;
            for (int c = 0; c < 32; c++)
                bias32[c] = (bias && col0 + c < n) ? bf16_to_float(bias[col0 + c]) : 0.0f;
            for (int64_t r0 = 0; r0 < m; r0 += 32) {
                int rows = (int)(m - r0 < 32 ? m - r0 : 32);
                int rows0 = rows < 16 ? rows : 16, rows1 = rows - rows0;
                int shape = rows0 * 64 + rows1;
                if (shape != configured) {
                    configure_tiles(rows0, rows1);
                    configured = shape;
                }
                if (rows1 > 0)
                    unit_tiles(x + r0 * x_stride, x_stride, unit, kb_count, acc, 1);
                else
                    unit_tiles(x + r0 * x_stride, x_stride, unit, kb_count, acc, 0);
                write_block(acc, rows, y + r0 * y_stride, y_stride, col0, n, bias32);
            }
        }
        if (configured >= 0) _tile_release();
    }
    return 0;
}
