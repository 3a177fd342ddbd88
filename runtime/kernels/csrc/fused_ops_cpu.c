/* Fused bf16 elementwise ops for the CPU decoder (RMSNorm, SiLU-and-multiply): one pass over
 * memory instead of the five to seven eager torch ops (and temporaries) each replaces. Rounding
 * to bf16 happens at the same points as in the torch reference, so results match it to the last
 * bit except where float32 summation order differs. The row functions live in fused_rows.h
 * (shared with decode_layers_cpu.c). Built by runtime/kernels/build.py.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "fused_rows.h"

/* out[r] = bf16(weight * bf16(x[r] * rsqrt(mean(x[r]^2) + eps))), rows `x_stride` apart. */
void fornax_rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *weight,
                          uint16_t *out, int rows, int dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * dim > 65536) schedule(static)
    for (int r = 0; r < rows; r++)
        rms_norm_row(x + (int64_t)r * x_stride, weight, out + (int64_t)r * dim, dim, eps);
}

/* out[r, j] = bf16(bf16(silu(g)) * u) with g = x[r, j], u = x[r, dim + j]. */
void fornax_silu_mul_bf16(const uint16_t *x, uint16_t *out, int rows, int dim, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * dim > 65536) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint16_t *g = x + (int64_t)r * 2 * dim;
        silu_mul_row(g, g + dim, out + (int64_t)r * dim, dim);
    }
}

/* Row-wise argmax of float32 logits (first index of the maximum, as torch.argmax).
 * Returns -1 if a row holds a NaN, where torch's answer (the NaN's index) is left to torch. */
int fornax_argmax_f32(const float *x, int rows, int cols, int64_t *out, int num_threads) {
    int has_nan = 0;
#pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * cols > 262144)               \
    schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * cols;
        float best = -INFINITY;
        int nan_seen = 0;
#pragma omp simd reduction(max : best) reduction(| : nan_seen)
        for (int j = 0; j < cols; j++) {
            best = xr[j] > best ? xr[j] : best;
            nan_seen |= xr[j] != xr[j];
        }
        int64_t idx = 0;
        for (int j = 0; j < cols; j++)
            if (xr[j] == best) {
                idx = j;
                break;
            }
        out[r] = idx;
        if (nan_seen) {
#pragma omp atomic write
            has_nan = 1;
        }
    }
    return has_nan ? -1 : 0;
}

/* Neox-style rotary embedding in place on a [tokens, heads, head_dim] bf16 view (last dim
 * contiguous): cos/sin rows come from float32 caches [max_pos, rotary_dim] indexed by position,
 * rounded to bf16 first, and each product and the sum rounded as the eager torch code does. */
void fornax_rotary_bf16(uint16_t *x, int64_t token_stride, int64_t head_stride, int tokens,
                        int heads, int rotary_dim, const int64_t *positions, const float *cos_cache,
                        const float *sin_cache, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if ((int64_t)tokens * heads * rotary_dim >       \
                                                          65536) schedule(static)
    for (int t = 0; t < tokens; t++) {
        const float *cs = cos_cache + positions[t] * rotary_dim;
        const float *sn = sin_cache + positions[t] * rotary_dim;
        for (int h = 0; h < heads; h++)
            rotary_head(x + (int64_t)t * token_stride + (int64_t)h * head_stride, rotary_dim, cs,
                        sn);
    }
}
