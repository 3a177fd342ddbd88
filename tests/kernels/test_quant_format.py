"""GGUF blocks repacked into fornax's q4/q8 layout: exact against the gguf package's dequantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fornax.runtime.kernels.quant_format import (
    QuantWeight,
    concat_rows,
    dequantize,
    from_tensors,
    nbytes,
    prepare_for_kernel,
    repack_gguf,
    row_major,
    take_rows,
    to_tensors,
)

T = gguf.GGMLQuantizationType


def _gguf_quantized(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Real quantized rows (the gguf package quantizes these types itself)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return gguf.quants.quantize(w, qtype)


def _random_blocks(qtype: T, n: int, k: int, halves: dict[int, float], seed: int = 0,
                   power_of_two: bool = False) -> np.ndarray:
    """Random block bytes with finite float16 fields at the byte offsets `halves` (scale)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    blocks = raw.reshape(n, k // block, size)
    for offset, scale in halves.items():
        if power_of_two:  # products with 6/8-bit integers stay exact in float16
            values = scale * 2.0 ** rng.integers(-3, 3, (n, k // block))
        else:
            values = rng.standard_normal((n, k // block)) * scale
        blocks[..., offset:offset + 2] = values.astype(np.float16).view(np.uint8).reshape(
            n, k // block, 2)
    return raw


def _half_at(raw: np.ndarray, qtype: T, n: int, k: int, offset: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(n, k // block, size)
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(
        np.float32)


@pytest.mark.parametrize("qtype,kind,group", [(T.Q8_0, "q8", 32), (T.Q4_0, "q4", 32),
                                              (T.Q4_1, "q4", 32)])
@pytest.mark.parametrize("source", ["quantized", "random_bytes"])
def test_legacy_types_repack_exactly(qtype, kind, group, source):
    n, k = 7, 96
    if source == "quantized":
        raw = _gguf_quantized(qtype, n, k)
    else:  # every bit pattern of the quants, float16 scales (and Q4_1 mins) of either sign
        halves = {0: 0.05} if qtype != T.Q4_1 else {0: 0.05, 2: 0.5}
        raw = _random_blocks(qtype, n, k, halves, seed=3)
    qw = repack_gguf(qtype, raw, (n, k))
    assert qw is not None
    assert (qw.kind, qw.group, qw.out_features, qw.in_features) == (kind, group, n, k)
    assert qw.source_type == qtype.name
    np.testing.assert_array_equal(dequantize(qw).numpy(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype,kind,group", [(T.Q4_K, "q4", 32), (T.Q6_K, "q8", 16)])
def test_k_quants_unpack_exactly_when_the_scales_fit_float16(qtype, kind, group):
    """Power-of-two super-block scales: every d * sc is a float16, so nothing rounds and the
    repack (6-bit packed scales, nibble and 2-bit planes) must match gguf's dequantizer exactly."""
    n, k = 5, 512
    halves = {0: 2.0 ** -8, 2: 2.0 ** -9} if qtype == T.Q4_K else {208: 2.0 ** -9}
    raw = _random_blocks(qtype, n, k, halves, seed=1, power_of_two=True)
    qw = repack_gguf(qtype, raw, (n, k))
    assert qw is not None and (qw.kind, qw.group) == (kind, group)
    np.testing.assert_array_equal(dequantize(qw).numpy(), gguf.quants.dequantize(raw, qtype))


def test_k_quant_scales_round_to_float16_within_half_an_ulp():
    """Arbitrary d: d * sc (and dmin * m) are rounded to float16, relative error <= 2**-11."""
    n, k = 6, 768
    raw = _random_blocks(T.Q4_K, n, k, {0: 0.01, 2: 0.01}, seed=2)
    ref = gguf.quants.dequantize(raw, T.Q4_K).reshape(n, k // 256, 256)
    got = dequantize(repack_gguf(T.Q4_K, raw, (n, k))).numpy().reshape(n, k // 256, 256)
    d, dmin = (np.abs(_half_at(raw, T.Q4_K, n, k, o))[..., None] for o in (0, 2))
    bound = 2.0 ** -11 * (15 * 63 * d + 63 * dmin) + 1e-6
    assert (np.abs(got - ref) <= bound).all()
    assert not np.array_equal(got, ref)  # the rounding is real: this test sees it

    raw = _random_blocks(T.Q6_K, n, k, {208: 0.01}, seed=2)
    ref = gguf.quants.dequantize(raw, T.Q6_K).reshape(n, k // 256, 256)
    got = dequantize(repack_gguf(T.Q6_K, raw, (n, k))).numpy().reshape(n, k // 256, 256)
    d = np.abs(_half_at(raw, T.Q6_K, n, k, 208))[..., None]
    assert (np.abs(got - ref) <= 2.0 ** -11 * 32 * 128 * d + 1e-6).all()


def test_other_types_and_unrepresentable_scales_stay_dense():
    assert repack_gguf(T.Q5_0, _gguf_quantized(T.Q5_0, 2, 64), (2, 64)) is None
    assert repack_gguf(T.F16, np.zeros((2, 64), np.float16).view(np.uint8), (2, 64)) is None
    raw = _random_blocks(T.Q4_0, 2, 64, {0: 0.0})
    raw.reshape(2, 2, 18)[0, 0, 0:2] = np.array([60000.0], np.float16).view(np.uint8)
    assert repack_gguf(T.Q4_0, raw, (2, 64)) is None  # -8 * d overflows float16
    with pytest.raises(ValueError, match="bytes"):
        repack_gguf(T.Q8_0, _gguf_quantized(T.Q8_0, 2, 64), (3, 64))


def _q4(n: int = 9, k: int = 64, seed: int = 0) -> QuantWeight:
    qw = repack_gguf(T.Q4_1, _gguf_quantized(T.Q4_1, n, k, seed), (n, k))
    assert qw is not None
    return qw


def test_rows_permute_slice_and_concatenate_independently():
    qw, other = _q4(), _q4(seed=1)
    dense = dequantize(qw)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dequantize(take_rows(qw, perm)), dense[perm])
    assert torch.equal(dequantize(take_rows(qw, slice(2, 5))), dense[2:5])
    assert torch.equal(dequantize(take_rows(qw, [8, 0])), dense[[8, 0]])
    both = concat_rows([take_rows(qw, slice(0, 4)), other, take_rows(qw, slice(4, 9))])
    assert both.out_features == 18
    assert torch.equal(dequantize(both), torch.cat([dense[:4], dequantize(other), dense[4:]]))


def test_concat_refuses_mixed_kinds_groups_and_widths():
    q8 = repack_gguf(T.Q8_0, _gguf_quantized(T.Q8_0, 3, 256), (3, 256))
    q6 = repack_gguf(T.Q6_K, _random_blocks(T.Q6_K, 3, 256, {208: 0.01}), (3, 256))
    assert q8 is not None and q6 is not None
    with pytest.raises(ValueError, match="cannot concatenate"):
        concat_rows([q8, q6])  # q8 group 32 vs group 16
    with pytest.raises(ValueError, match="cannot concatenate"):
        concat_rows([_q4(k=256), q8])
    with pytest.raises(ValueError, match="cannot concatenate"):
        concat_rows([_q4(k=64), _q4(k=96)])
    with pytest.raises(ValueError):
        concat_rows([])


def test_tensors_round_trip_through_a_safetensors_file(tmp_path):
    q4 = _q4()
    q8 = repack_gguf(T.Q6_K, _random_blocks(T.Q6_K, 4, 256, {208: 0.01}), (4, 256))
    assert q8 is not None
    tensors = {**to_tensors(q4, "layers.0.mlp.weight"), **to_tensors(q8, "lm_head.weight")}
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    for qw, prefix in ((q4, "layers.0.mlp.weight"), (q8, "lm_head.weight")):
        back = from_tensors(loaded, prefix)
        assert back is not None
        assert (back.kind, back.group, back.out_features, back.in_features, back.source_type) == \
            (qw.kind, qw.group, qw.out_features, qw.in_features, qw.source_type)
        assert torch.equal(dequantize(back), dequantize(qw))
    assert from_tensors(loaded, "layers.1.mlp.weight") is None


def test_nbytes_and_shape_checks():
    qw = _q4(n=9, k=64)
    assert nbytes(qw) == 9 * 32 + 2 * (9 * 2 * 2)  # nibbles + float16 scales and mins
    with pytest.raises(ValueError, match="data shape"):
        QuantWeight("q4", 9, 64, 32, qw.data[:, :16], qw.scales, qw.mins, "Q4_1")
    with pytest.raises(ValueError, match="mins"):
        QuantWeight("q4", 9, 64, 32, qw.data, qw.scales, None, "Q4_1")
    with pytest.raises(ValueError, match="kind"):
        QuantWeight("q2", 9, 64, 32, qw.data, qw.scales, qw.mins, "Q4_1")


@pytest.mark.parametrize("qtype,n,k", [(T.Q4_1, 9, 64), (T.Q4_0, 16, 96), (T.Q8_0, 33, 64),
                                       (T.Q4_K, 5, 256), (T.Q6_K, 17, 256)])
def test_panel_layout_round_trips_exactly(qtype, n, k):
    """prepare_for_kernel pads to whole 16-row panels and interleaves the rows' 4-byte words;
    row_major undoes it bit for bit (q8's + 128 included), and dequantize reads either layout."""
    if qtype in (T.Q4_1, T.Q4_0, T.Q8_0):
        raw = _gguf_quantized(qtype, n, k)
    else:
        raw = _random_blocks(qtype, n, k, {0: 0.01, 2: 0.01} if qtype == T.Q4_K else {208: 0.01})
    qw = repack_gguf(qtype, raw, (n, k))
    assert qw is not None and qw.layout == "rows"
    panel = prepare_for_kernel(qw)
    padded = -(-n // 16) * 16
    assert panel.layout == "panel16" and panel.out_features == n and panel.stored_rows == padded
    assert panel.data.shape[0] == panel.scales.shape[0] == padded
    assert prepare_for_kernel(panel) is panel and row_major(qw) is qw
    back = row_major(panel)
    assert back.layout == "rows" and back.data.dtype == qw.data.dtype
    for a, b in ((back.data, qw.data), (back.scales, qw.scales), (back.mins, qw.mins)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(dequantize(panel), dequantize(qw))
    # word w of row r sits at bytes 64 w + 4 r of its panel
    width = qw.data.shape[1]
    row = 1 if n > 1 else 0
    words = panel.data[:16].reshape(-1)[4 * row::64]
    data = qw.data.view(torch.uint8) ^ (0x80 if qw.kind == "q8" else 0)
    assert torch.equal(words, data[row, 0:width:4])
    assert nbytes(panel) == nbytes(qw) * padded // n


def test_a_prepared_weight_refuses_row_operations_and_the_cache():
    panel = prepare_for_kernel(_q4())
    for call in (lambda: take_rows(panel, [0]), lambda: concat_rows([_q4(), panel]),
                 lambda: to_tensors(panel, "w")):
        with pytest.raises(ValueError, match="row-major"):
            call()
    with pytest.raises(ValueError, match="layout"):
        QuantWeight("q4", 9, 64, 32, panel.data, panel.scales, panel.mins, "Q4_1", "tiles")
    with pytest.raises(ValueError, match="data shape"):  # panel16 holds 16 rows, not 9
        QuantWeight("q4", 9, 64, 32, _q4().data, _q4().scales, _q4().mins, "Q4_1", "panel16")
