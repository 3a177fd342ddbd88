/* AVX-512 exp and softmax helpers shared by the CPU kernels (included, not built on its own). */
#ifndef FORNAX_SOFTMAX_AVX512_H
#define FORNAX_SOFTMAX_AVX512_H
#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

/* exp, ~2 ulp; +inf above 88.72 (scalef overflows; the clamp at 89 keeps the reduction exact),
 * exp(-87) below -87 (the callers add it to 1 or to sums of larger terms). */
static inline __m512 exp_avx512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(89.f));
    const __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(t, _mm512_set1_ps(1.428606765330187e-06f),
                                      _mm512_fnmadd_ps(t, _mm512_set1_ps(0.693145751953125f), x));
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(q, t);
}

/* exp(x - m) over n floats in place (16 lanes at a time, masked tail); returns their sum. */
static inline float exp_shift_sum_avx512(float *x, int n, float m) {
    const __m512 vm = _mm512_set1_ps(m);
    __m512 total = _mm512_setzero_ps();
    for (int p = 0; p < n; p += 16) {
        const __mmask16 k = tail_mask16(n - p);
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + p), vm));
        _mm512_mask_storeu_ps(x + p, k, e);
        total = _mm512_mask_add_ps(total, k, total, e);
    }
    return _mm512_reduce_add_ps(total);
}

#if defined(__AVX512BF16__)
/* Softmax weights of scores s[0, n) with maximum m, rounded to bf16 into prob[0, padded) (zero
 * past n); s holds the float32 weights afterwards. Returns 1 / their float32 sum. */
static inline float softmax_to_bf16(float *s, uint16_t *prob, int n, int padded, float m) {
    const float inv = 1.f / exp_shift_sum_avx512(s, n, m);
    for (int p = 0; p < padded; p += 16)
        bf16x16_store_hw(prob + p, _mm512_maskz_loadu_ps(tail_mask16(n - p), s + p),
                         tail_mask16(padded - p));
    return inv;
}
#endif
#endif
#endif
