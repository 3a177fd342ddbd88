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

#include "amx_tiles.h"
#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Ask Linux for the AMX tile state for this process; 0 when granted. */
int fornax_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
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
