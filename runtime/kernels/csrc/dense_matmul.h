/* The dense bf16 matmul of decode-sized batches (1 to ~40 activation rows) shared by
 * decode_layers_cpu.c (included, not built on its own): y = x @ W^T (+ b) with bf16 x, y and
 * bias and float32 sums, W in amx_linear's tile layout (kernels/amx_linear.py pack_for_amx:
 * units of 32 output columns, each a contiguous run of blocks of 32 inputs, each block two
 * halves of 16 columns x 16 input pairs x 2). A half's 64-byte row of pairs is one vector of 16
 * output lanes, so AVX512-BF16 (vdpbf16ps) multiplies it by a broadcast pair of inputs with no
 * horizontal sum, each weight load serving up to DENSE_MT activation rows; the portable loop
 * reads the same layout. A batch row's sums run in the same order whatever the batch, so a
 * token's values do not depend on the rows beside it. Where the CPU has AMX (Dense.amx), the
 * units run on amx_linear's own tile code (amx_tiles.h) instead: the per-op path's values.
 */
#ifndef FORNAX_DENSE_MATMUL_H
#define FORNAX_DENSE_MATMUL_H
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#if defined(__x86_64__)
#include "amx_tiles.h"
#define HAVE_AMX_TILES 1
#else
#define HAVE_AMX_TILES 0
#endif

#define DENSE_UNIT 32    /* output columns per unit */
#define DENSE_KB 32      /* inputs per block */
#define DENSE_HALF 512   /* bf16 elements of one half block (16 pairs x 16 columns x 2) */
#define DENSE_MT 8       /* activation rows per pass over a unit (2 x 8 accumulators) */
#define DENSE_AHEAD 2048 /* bytes ahead in the weight stream that are prefetched */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAVE_DENSE_BF16 1
#else
#define HAVE_DENSE_BF16 0
#endif

/* One dense matmul: m rows of x (k inputs, row stride k) times the packed W (n outputs, N
 * padded to a multiple of 32; k a multiple of 32) into out (row stride ostride), + bias. */
typedef struct {
    const uint16_t *w, *x, *bias;
    uint16_t *out;
    int m, n, k;
    int64_t ostride;
    int amx; /* on the AMX tiles (the caller checked the CPU and the tile state) */
} Dense;

/* Whether W of n x k is a shape the layout holds. */
static int dense_shape_ok(int n, int k) { return n > 0 && k > 0 && k % DENSE_KB == 0; }

/* Lanes [0, cols) of the 32 sums v of activation row r, unit u: + bias, rounded, stored. */
static void dense_store(const Dense *p, int u, int r, const float *v) {
    const int c0 = u * DENSE_UNIT, cols = p->n - c0 < DENSE_UNIT ? p->n - c0 : DENSE_UNIT;
    uint16_t *dst = p->out + (int64_t)r * p->ostride + c0;
    for (int c = 0; c < cols; c++)
        dst[c] = float_to_bf16(v[c] + (p->bias ? bf16_to_float(p->bias[c0 + c]) : 0.f));
}

/* Plain C: unit u against activation rows r0 .. r0 + mt - 1 (pair products summed in the
 * vector instruction's order: both products of a pair, then into the running sum). */
static void dense_unit_c(const Dense *p, int u, int r0, int mt) {
    const int blocks = p->k / DENSE_KB;
    const uint16_t *unit = p->w + (int64_t)u * blocks * 2 * DENSE_HALF;
    for (int j = 0; j < mt; j++) {
        const uint16_t *x = p->x + (int64_t)(r0 + j) * p->k;
        float acc[DENSE_UNIT] = {0};
        for (int kb = 0; kb < blocks; kb++)
            for (int h = 0; h < 2; h++) {
                const uint16_t *wb = unit + ((int64_t)kb * 2 + h) * DENSE_HALF;
                for (int kp = 0; kp < DENSE_KB / 2; kp++) {
                    const float x0 = bf16_to_float(x[kb * DENSE_KB + 2 * kp]);
                    const float x1 = bf16_to_float(x[kb * DENSE_KB + 2 * kp + 1]);
                    const uint16_t *wr = wb + kp * 32;
                    float *a = acc + h * 16;
#pragma omp simd
                    for (int c = 0; c < 16; c++)
                        a[c] += bf16_to_float(wr[2 * c]) * x0 + bf16_to_float(wr[2 * c + 1]) * x1;
                }
            }
        dense_store(p, u, r0 + j, acc);
    }
}

#if HAVE_DENSE_BF16
/* Unit u against activation rows r0 .. r0 + mt - 1 with vdpbf16ps; mt a constant of each
 * instance, so every accumulator stays in a register. */
static inline __attribute__((always_inline)) void dense_unit_bf16(const Dense *p, int u, int r0,
                                                                  const int mt) {
    const int blocks = p->k / DENSE_KB;
    const uint16_t *unit = p->w + (int64_t)u * blocks * 2 * DENSE_HALF;
    const uint16_t *x[DENSE_MT];
    __m512 acc[2][DENSE_MT];
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) {
        x[j] = p->x + (int64_t)(r0 + j) * p->k;
        acc[0][j] = acc[1][j] = _mm512_setzero_ps();
    }
    for (int kb = 0; kb < blocks; kb++) {
        const uint16_t *wb = unit + (int64_t)kb * 2 * DENSE_HALF;
        for (int line = 0; line < 2 * DENSE_HALF * 2; line += 64)
            _mm_prefetch((const char *)wb + DENSE_AHEAD + line, _MM_HINT_T0);
#pragma GCC unroll 16
        for (int kp = 0; kp < DENSE_KB / 2; kp++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + kp * 32);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + DENSE_HALF + kp * 32);
#pragma GCC unroll 8
            for (int j = 0; j < mt; j++) {
                int32_t pair;
                memcpy(&pair, x[j] + kb * DENSE_KB + 2 * kp, 4);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                acc[0][j] = _mm512_dpbf16_ps(acc[0][j], w0, xv);
                acc[1][j] = _mm512_dpbf16_ps(acc[1][j], w1, xv);
            }
        }
    }
    const int c0 = u * DENSE_UNIT;
    const __mmask16 k0 = tail_mask16(p->n - c0), k1 = tail_mask16(p->n - c0 - 16);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (p->bias != NULL) {
        b0 = bf16x16_load(p->bias + c0, k0);
        b1 = bf16x16_load(p->bias + c0 + 16, k1);
    }
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) {
        uint16_t *dst = p->out + (int64_t)(r0 + j) * p->ostride + c0;
        bf16x16_store(dst, _mm512_add_ps(acc[0][j], b0), k0);
        bf16x16_store(dst + 16, _mm512_add_ps(acc[1][j], b1), k1);
    }
}

static void dense_units_bf16(const Dense *p, int u, int r0, int mt) {
    switch (mt) { /* one compiled copy per row count */
    case 1:
        dense_unit_bf16(p, u, r0, 1);
        break;
    case 2:
        dense_unit_bf16(p, u, r0, 2);
        break;
    case 3:
        dense_unit_bf16(p, u, r0, 3);
        break;
    case 4:
        dense_unit_bf16(p, u, r0, 4);
        break;
    case 5:
        dense_unit_bf16(p, u, r0, 5);
        break;
    case 6:
        dense_unit_bf16(p, u, r0, 6);
        break;
    case 7:
        dense_unit_bf16(p, u, r0, 7);
        break;
    default:
        dense_unit_bf16(p, u, r0, 8);
        break;
    }
}
#endif

#if HAVE_AMX_TILES
static _Thread_local int dense_amx_shape = -1; /* this thread's configured tile shape, -1: none */

/* Unit u against all of p's rows on the AMX tiles, 32 rows at a time, as amx_linear_bf16's loop
 * runs it (the same calls in the same order: its values). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw"))) static void
dense_unit_amx(const Dense *p, int u) {
    const int blocks = p->k / DENSE_KB;
    const uint16_t *unit = p->w + (int64_t)u * blocks * 2 * DENSE_HALF;
    const int64_t col0 = (int64_t)u * DENSE_UNIT;
    float acc[32 * 32] __attribute__((aligned(64)));
    float bias32[32] __attribute__((aligned(64)));
    for (int c = 0; c < 32; c++)
        bias32[c] = (p->bias && col0 + c < p->n) ? bf16_to_float(p->bias[col0 + c]) : 0.0f;
    for (int r0 = 0; r0 < p->m; r0 += 32) {
        const int rows = p->m - r0 < 32 ? p->m - r0 : 32;
        const int rows0 = rows < 16 ? rows : 16, rows1 = rows - rows0, shape = rows0 * 64 + rows1;
        if (shape != dense_amx_shape) {
            configure_tiles(rows0, rows1);
            dense_amx_shape = shape;
        }
        const uint16_t *x = p->x + (int64_t)r0 * p->k;
        if (rows1 > 0)
            unit_tiles(x, p->k, unit, blocks, acc, 1);
        else
            unit_tiles(x, p->k, unit, blocks, acc, 0);
        write_block(acc, rows, p->out + (int64_t)r0 * p->ostride, p->ostride, col0, p->n, bias32);
    }
}

/* Gives back this thread's tile state (at the end of the parallel region that used it). */
__attribute__((target("amx-tile"))) static void dense_release(void) {
    if (dense_amx_shape >= 0) _tile_release();
    dense_amx_shape = -1;
}
#else
static void dense_release(void) {}
#endif

/* Every unit of p against its m activation rows, shared among the threads of the enclosing
 * OpenMP parallel region (an orphaned `omp for`: serial outside one); ends with its barrier. */
static void dense_units(const Dense *p) {
    const int units = (p->n + DENSE_UNIT - 1) / DENSE_UNIT;
#pragma omp for schedule(static)
    for (int u = 0; u < units; u++) {
#if HAVE_AMX_TILES
        if (p->amx) {
            dense_unit_amx(p, u);
            continue;
        }
#endif
        for (int r0 = 0; r0 < p->m; r0 += DENSE_MT) {
            const int mt = p->m - r0 < DENSE_MT ? p->m - r0 : DENSE_MT;
#if HAVE_DENSE_BF16
            dense_units_bf16(p, u, r0, mt);
            continue;
#endif
            dense_unit_c(p, u, r0, mt);
        }
    }
}
#endif
