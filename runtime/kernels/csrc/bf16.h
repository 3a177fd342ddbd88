/* bf16 <-> float32 helpers shared by the CPU kernels (included, not built on its own): scalar
 * conversions that round as torch does, and 16-lane AVX-512 masks, loads and stores.
 *
 * The AVX-512 helpers carry their own target attribute, so a file that is built for a CPU
 * without AVX-512 and only calls them from target-attributed code (amx_linear_cpu.c) still
 * builds; files built with -march=native on an AVX-512 CPU inline them as usual.
 */
#ifndef FORNAX_BF16_H
#define FORNAX_BF16_H
#include <stdint.h>

/* The float32 a bf16 bit pattern stands for (exact). */
static inline float bf16_to_float(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

/* float32 -> bf16, rounding to nearest even; a NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float f) {
    union {
        uint32_t u;
        float f;
    } c;
    c.f = f;
    uint32_t u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* f rounded to the nearest bf16 value, kept as float32 (torch's bf16 intermediate results). */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define FORNAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* Lanes [0, left) of 16: none when left <= 0, all when left >= 16. */
static inline __mmask16 tail_mask16(int left) {
    return left >= 16  ? (__mmask16)0xffff
           : left <= 0 ? (__mmask16)0
                       : (__mmask16)((1u << left) - 1u);
}

/* 16 bf16 values -> 16 floats (exact). */
FORNAX_AVX512 static inline __m512 bf16x16_to_float(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Lanes of mask k from p as floats; the other lanes are 0 (and p is not read there). */
FORNAX_AVX512 static inline __m512 bf16x16_load(const uint16_t *p, __mmask16 k) {
    return bf16x16_to_float(_mm256_maskz_loadu_epi16(k, p));
}

/* v rounded to bf16 as float_to_bf16 rounds (nearest even, NaN stays NaN), in the upper 16 bits
 * of each lane (the lower bits are left over). Integer ops: the AVX512-BF16 conversion
 * instruction flushes denormals to zero, torch does not. */
FORNAX_AVX512 static inline __m512i bf16x16_round_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000));
}

/* 16 floats -> 16 bf16 (bf16x16_round_bits). */
FORNAX_AVX512 static inline __m256i bf16x16_round(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16x16_round_bits(v), 16));
}

/* 16 floats rounded to bf16 values, kept as float32 (round_bf16 per lane). */
FORNAX_AVX512 static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(bf16x16_round_bits(v), _mm512_set1_epi32((int)0xffff0000u)));
}

/* Lanes of mask k of v rounded to bf16 (bf16x16_round) and stored at dst. */
FORNAX_AVX512 static inline void bf16x16_store(uint16_t *dst, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16(dst, k, bf16x16_round(v));
}

#if defined(__AVX512BF16__)
/* Lanes of mask k of v stored at dst as bf16 by the AVX512-BF16 instruction (nearest even,
 * denormals flushed): the attention kernels' weights and outputs, rounded as GPU kernels do. */
static inline void bf16x16_store_hw(uint16_t *dst, __m512 v, __mmask16 k) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    if (__builtin_constant_p(k) && k == 0xffff) /* all lanes: the plain store */
        _mm256_storeu_si256((__m256i *)dst, h);
    else
        _mm256_mask_storeu_epi16(dst, k, h);
}
#endif
#endif
#endif
