/* Paged decode attention on the CPU: one query token per sequence, read in place from the paged
 * KV cache (layout per layer [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]).
 *
 * Work is split over sequences (or (sequence, kv head) pairs when sequences are few) with OpenMP;
 * every query head of a group shares one pass over its kv head's keys and values, so
 * grouped-query attention reads the cache once. Two paths: bf16 with a head_dim that is a
 * multiple of 32 (register-tiled, AVX512-BF16, compiled per head_dim), and portable C that widens
 * each block to float32 and lets the compiler vectorize (float32, other head dims, CPUs without
 * AVX512-BF16).
 * The kernels live in paged_decode.h (shared with decode_layers_cpu.c). Built by
 * runtime/kernels/build.py.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "paged_decode.h"

/* q, out: [num_seqs, num_q_heads, head_dim] contiguous; block_table: [num_seqs, bt_stride] int32.
 * Returns 0, or -1 when the shape is outside the kernel's limits (the caller falls back). */
int fornax_paged_decode(const void *q, const void *cache, const int32_t *block_table,
                        int64_t bt_stride, const int32_t *seq_lens, void *out, int num_seqs,
                        int num_q_heads, int num_kv_heads, int head_dim, int block_size,
                        float scale, int is_bf16, int num_threads) {
    if (!decode_attn_supported(num_q_heads, num_kv_heads, head_dim, block_size)) return -1;
    const DecodeAttn a = {q,          cache,    block_table, seq_lens,     bt_stride,
                          out,        num_seqs, num_q_heads, num_kv_heads, head_dim,
                          block_size, is_bf16,  scale};
    const int max_len = decode_attn_max_len(&a);
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        void *scratch = malloc(decode_attn_scratch_bytes(&a, max_len));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        decode_attn_items(&a, max_len, num_threads, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
