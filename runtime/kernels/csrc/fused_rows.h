/* One row of the fused bf16 elementwise ops (RMSNorm, SiLU-and-multiply, rotary), shared by
 * fused_ops_cpu.c and decode_layers_cpu.c (included, not built on its own). Rounding to bf16
 * happens at the same points as in the eager torch code (fused_ops_cpu.c).
 */
#ifndef FORNAX_FUSED_ROWS_H
#define FORNAX_FUSED_ROWS_H
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "softmax_avx512.h"

/* o = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))) over one row of dim values. */
static inline void rms_norm_row(const uint16_t *xr, const uint16_t *weight, uint16_t *o, int dim,
                                float eps) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < dim; j++) {
        const float v = bf16_to_float(xr[j]);
        sum += v * v;
    }
    const float scale = 1.f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
    for (int j = 0; j < dim; j++)
        o[j] = float_to_bf16(bf16_to_float(weight[j]) * round_bf16(bf16_to_float(xr[j]) * scale));
}

/* o[j] = bf16(bf16(silu(g[j])) * u[j]) for j < dim. */
static inline void silu_mul_row(const uint16_t *g, const uint16_t *u, uint16_t *o, int dim) {
    int j = 0;
#if defined(__AVX512F__)
    for (; j < dim; j += 16) {
        const __mmask16 k = tail_mask16(dim - j);
        const __m512 gv = bf16x16_load(g + j, k), uv = bf16x16_load(u + j, k);
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        bf16x16_store(o + j, _mm512_mul_ps(round_bf16x16(s), uv), k);
    }
#endif
    for (; j < dim; j++) {
        const float gf = bf16_to_float(g[j]);
        o[j] = float_to_bf16(round_bf16(gf / (1.f + expf(-gf))) * bf16_to_float(u[j]));
    }
}

/* Neox-style rotary in place on the first rotary_dim values of one head v, with the float32
 * cos/sin rows cs, sn of its position (rounded to bf16 first, as the eager code does). */
static inline void rotary_head(uint16_t *v, int rotary_dim, const float *cs, const float *sn) {
    const int half = rotary_dim / 2;
#pragma omp simd
    for (int i = 0; i < half; i++) {
        const float x1 = bf16_to_float(v[i]), x2 = bf16_to_float(v[i + half]);
        const float c1 = round_bf16(cs[i]), s1 = round_bf16(sn[i]);
        const float c2 = round_bf16(cs[i + half]), s2 = round_bf16(sn[i + half]);
        v[i] = float_to_bf16(round_bf16(x1 * c1) + round_bf16(-x2 * s1));
        v[i + half] = float_to_bf16(round_bf16(x2 * c2) + round_bf16(x1 * s2));
    }
}
#endif
