"""Weight-only quantized linear layers and embeddings: every path against F.linear over the
dequantized weight, within the stated int8 activation-rounding bound."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fornax.runtime.kernels import quant_linear as ql
from fornax.runtime.kernels.build import load_quant_linear
from fornax.runtime.kernels.quant_format import (
    QuantWeight,
    dequantize,
    prepare_for_kernel,
    repack_gguf,
    row_major,
)
from fornax.runtime.kernels.quant_linear import (
    DENSE_MIN_ROWS,
    linear_reference,
    prepare_in_place,
    quant_embedding,
    quant_isa,
    quant_linear,
)
from helpers.native import cpu_lacks, has_c_compiler, require_kernel, x86_64

T = gguf.GGMLQuantizationType


def _weight(qtype: T, n: int, k: int, seed: int = 0) -> QuantWeight:
    rng = np.random.default_rng(seed)
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    else:  # the gguf package cannot quantize K-quants: random blocks with sane float16 scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
        blocks = raw.reshape(n, k // block, size)
        for offset in ((0, 2) if qtype == T.Q4_K else (208,)):
            half = (rng.standard_normal((n, k // block)) * 0.01).astype(np.float16)
            blocks[..., offset:offset + 2] = half.view(np.uint8).reshape(n, k // block, 2)
    qw = repack_gguf(qtype, raw, (n, k))
    assert qw is not None
    return qw


def _check(got: torch.Tensor, x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None):
    """|got - x @ W^T - b| within the activation rounding bound: per group, amax / 254 times the
    group's sum of |w| (plus bf16 rounding of the result, and of W on the dense torch path)."""
    w = dequantize(qw)
    xf = x.float().reshape(-1, qw.in_features)
    ref = F.linear(xf, w, None if bias is None else bias.float())
    groups = qw.in_features // qw.group
    amax = xf.reshape(-1, groups, qw.group).abs().amax(-1)
    wsum = w.abs().reshape(qw.out_features, groups, qw.group).sum(-1)
    bound = (amax / 254) @ wsum.T
    magnitude = xf.abs() @ w.abs().T
    slack = 1e-5 * magnitude + 1e-6
    if x.dtype == torch.bfloat16:
        slack = slack + 2.0 ** -8 * (ref.abs() + 2 * magnitude)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], qw.out_features)
    err = (got.float().reshape(ref.shape) - ref).abs()
    assert (err <= bound + slack).all(), float((err / (bound + slack)).max())


needs_kernel = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler on this host")
PATHS = [None, "kernel", "c", "torch"]  # None: the dispatch (dense torch from 48 rows)


@pytest.mark.parametrize("qtype,n,k", [(T.Q4_1, 37, 576), (T.Q4_0, 37, 96), (T.Q8_0, 37, 576),
                                       (T.Q8_0, 5, 32), (T.Q4_K, 19, 512), (T.Q6_K, 19, 768)])
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["rows", "panel16"])  # prepared on first use, or beforehand
def test_matches_the_dequantized_reference(qtype, n, k, rows, dtype, path, layout):
    torch.manual_seed(rows)
    qw = _weight(qtype, n, k, seed=rows)
    if layout == "panel16":
        qw = prepare_for_kernel(qw)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(n) if rows % 2 else None
    _check(quant_linear(x, qw, bias, isa=path), x, qw, bias)


@needs_kernel
def test_kernel_path_is_the_one_taken_and_agrees_with_the_plain_c_loop():
    require_kernel(load_quant_linear)
    qw = _weight(T.Q4_1, 64, 576)
    x = torch.randn(5, 576)
    fast, plain = quant_linear(x, qw), quant_linear(x, qw, isa="c")
    # same int8 activations and integer sums; only the float summation order differs
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    assert not torch.equal(fast, linear_reference(x, qw))  # the kernel really ran, not torch


@pytest.mark.skipif(not x86_64(), reason="the AVX512-VNNI path is x86-64 only")
@cpu_lacks("avx512_vnni", "avx512bw")
def test_vnni_cpu_gets_the_vnni_path():
    require_kernel(load_quant_linear)
    assert quant_isa() == "avx512-vnni"


def test_bias_dtypes_shapes_and_strides():
    qw = _weight(T.Q4_1, 40, 128)
    x = torch.randn(2, 3, 256)[..., ::2]  # non-contiguous, three dimensions
    for bias in (None, torch.randn(40), torch.randn(40).to(torch.bfloat16),
                 torch.randn(80)[::2], torch.randn(40).double()):
        _check(quant_linear(x, qw, bias), x, qw, bias)
    assert quant_linear(torch.randn(0, 128), qw).shape == (0, 40)
    with pytest.raises(ValueError, match="features"):
        quant_linear(torch.randn(1, 64), qw)
    with pytest.raises(ValueError, match="bias"):  # the kernel would read 40 values of it
        quant_linear(torch.randn(1, 128), qw, torch.randn(39))
    with pytest.raises(ValueError, match="isa"):
        quant_linear(torch.randn(1, 128), qw, isa="avx9")
    # a dtype the kernel does not take goes to the torch path, same answer
    half = torch.randn(2, 128).to(torch.float16)
    assert quant_linear(half, qw).dtype == torch.float16


@needs_kernel
@pytest.mark.parametrize("chunk", [1 << 20, 16 * 256])  # one chunk; 16-row chunks (3 of 40)
def test_large_batches_on_the_plain_c_kernel_take_the_dense_path(monkeypatch, chunk):
    """A CPU without AVX512-VNNI: from DENSE_MIN_ROWS rows, chunks of dequantized weight rows
    (read from the panel layout) for F.linear, the same answer as over the whole weight."""
    lib = require_kernel(load_quant_linear)
    monkeypatch.setattr(ql, "_kernel", lambda: (lib, 0))
    monkeypatch.setattr(ql, "DENSE_CHUNK", chunk)
    qw = _weight(T.Q4_K, 40, 256)
    x = torch.randn(DENSE_MIN_ROWS + 3, 256)
    bias = torch.randn(40)
    torch.testing.assert_close(quant_linear(x, qw, bias), F.linear(x, dequantize(qw), bias))
    assert qw.layout == "panel16"
    xb = x.to(torch.bfloat16)
    _check(quant_linear(xb, qw, bias), xb, qw, bias)


@pytest.mark.skipif(not x86_64(), reason="AMX is x86-64 only")
@cpu_lacks("amx_bf16", "amx_tile", "avx512_bf16")
@pytest.mark.parametrize("chunk", [1 << 18, 2 * 16 * 256])  # one chunk; 32-column chunks
@pytest.mark.parametrize("qtype,n,k", [(T.Q4_K, 77, 256), (T.Q8_0, 40, 256), (T.Q6_K, 33, 512)])
def test_large_bf16_batches_on_amx_dequantize_into_tiles(monkeypatch, chunk, qtype, n, k):
    """bf16 prefill batches on an AMX CPU: the weight dequantized into AMX tiles chunk by
    chunk (odd panel counts, a ragged last unit), the answer F.linear gives over the bf16
    dequantized weight, up to the output's bf16 rounding."""
    require_kernel(load_quant_linear)
    assert ql._amx()
    monkeypatch.setattr(ql, "AMX_CHUNK", chunk)
    calls = []
    real = ql._amx_dense_linear
    monkeypatch.setattr(ql, "_amx_dense_linear", lambda *a: calls.append(1) or real(*a))
    qw = _weight(qtype, n, k)
    x = torch.randn(2, DENSE_MIN_ROWS // 2 + 3, k).to(torch.bfloat16)
    bias = torch.randn(n)
    got = quant_linear(x, qw, bias)
    assert calls and got.shape == (*x.shape[:-1], n) and got.dtype == torch.bfloat16
    w16 = dequantize(qw).to(torch.bfloat16).float()
    want = F.linear(x.float(), w16, bias.to(torch.bfloat16).float())
    slack = 2.0 ** -8 * want.abs() + 1e-5 * (x.float().abs() @ w16.abs().T) + 1e-6
    assert ((got.float() - want).abs() <= slack).all()
    few = x[:, :2]  # below DENSE_MIN_ROWS: the kernel
    _check(quant_linear(few, qw, bias), few, qw, bias)
    assert len(calls) == 1


def test_fallback_without_the_kernel(monkeypatch):
    """FORNAX_NATIVE_KERNELS=0 (or no compiler): every call dequantizes and uses F.linear."""
    monkeypatch.setattr(ql, "_kernel", lambda: None)
    qw = _weight(T.Q8_0, 12, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(quant_linear(x, qw), linear_reference(x, qw))
    ids = torch.tensor([3, 0, 11])
    assert torch.equal(quant_embedding(qw, ids, torch.float32), dequantize(qw)[ids])


def test_native_kernels_off_reports_torch():
    env = dict(os.environ, FORNAX_NATIVE_KERNELS="0")
    code = "from fornax.runtime.kernels.quant_linear import quant_isa; print(quant_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "torch"


@pytest.mark.parametrize("qtype,k", [(T.Q4_1, 96), (T.Q8_0, 64), (T.Q4_K, 256), (T.Q6_K, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_are_exact(qtype, k, dtype):
    qw = _weight(qtype, 50, k)
    ids = torch.tensor([[7, 0, 49], [7, 3, 12]])
    got = quant_embedding(qw, ids, dtype)
    assert got.shape == (2, 3, k) and got.dtype == dtype
    assert torch.equal(got, dequantize(qw)[ids].to(dtype))
    with pytest.raises(IndexError):
        quant_embedding(qw, torch.tensor([50]), dtype)


def test_concurrent_calls_from_several_threads_agree_with_sequential_ones():
    qws = [_weight(T.Q4_1, 96, 576, seed=s) for s in range(3)]
    xs = [torch.randn(m, 576).to(torch.bfloat16) for m in (1, 5, 16, 2)]
    expected = {(i, j): quant_linear(x, qw) for i, qw in enumerate(qws) for j, x in enumerate(xs)}
    failures: list[tuple[int, int]] = []

    def work() -> None:
        for _ in range(20):
            for (i, j), want in expected.items():
                if not torch.equal(quant_linear(xs[j], qws[i]), want):
                    failures.append((i, j))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@needs_kernel
def test_first_use_prepares_the_weight_in_place_once():
    require_kernel(load_quant_linear)
    qw = _weight(T.Q6_K, 19, 256)
    dense, old_data = dequantize(qw), qw.data
    x = torch.randn(2, 256)
    first = quant_linear(x, qw)
    assert qw.layout == "panel16" and qw.data is not old_data and qw.data.shape[0] == 32
    assert torch.equal(dequantize(qw), dense)
    data = qw.data
    assert torch.equal(quant_linear(x, qw), first) and qw.data is data  # not prepared twice
    assert prepare_in_place(qw) is qw and qw.data is data
    _check(first, x, qw, None)


@needs_kernel
def test_concurrent_first_uses_prepare_one_weight_once():
    require_kernel(load_quant_linear)
    qw = _weight(T.Q4_1, 200, 576)
    ref = prepare_for_kernel(qw)
    x = torch.randn(3, 576).to(torch.bfloat16)
    want = quant_linear(x, ref)
    got: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: got.append(quant_linear(x, qw)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(torch.equal(g, want) for g in got)
    assert qw.layout == "panel16" and torch.equal(qw.data, ref.data)


@pytest.mark.parametrize("qtype,n,k", [(T.Q4_1, 200, 576), (T.Q8_0, 131, 640),
                                       (T.Q6_K, 77, 512)])
@pytest.mark.parametrize("rows", [1, 2, 5, 47])
def test_two_threads_agree_with_one(qtype, n, k, rows):
    """Work split over panels (two panels per block, odd panel counts, a ragged last panel)
    gives the same bits with 2 threads as with 1; both within the bound."""
    qw = prepare_for_kernel(_weight(qtype, n, k, seed=n))
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quant_linear(x, qw, bias, isa="kernel")
        plain = quant_linear(x, qw, bias, isa="c")
        torch.set_num_threads(2)
        two = quant_linear(x, qw, bias, isa="kernel")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    _check(one, x, qw, bias)
    _check(plain, x, qw, bias)


@pytest.mark.parametrize("qtype,k", [(T.Q4_1, 96), (T.Q6_K, 256)])
def test_embedding_rows_of_a_prepared_table_are_exact(qtype, k):
    qw = _weight(qtype, 50, k)
    dense = dequantize(qw)
    prepared = prepare_for_kernel(qw)
    ids = torch.tensor([[7, 0, 49], [7, 3, 12]])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(quant_embedding(prepared, ids, dtype), dense[ids].to(dtype))


def test_fallback_without_the_kernel_reads_a_prepared_weight(monkeypatch):
    monkeypatch.setattr(ql, "_kernel", lambda: None)
    qw = _weight(T.Q4_K, 40, 256)
    prepared = prepare_for_kernel(qw)
    x = torch.randn(3, 256)
    assert torch.equal(quant_linear(x, prepared), linear_reference(x, row_major(prepared)))
    assert prepare_in_place(qw) is qw and qw.layout == "rows"  # nothing to prepare for
    ids = torch.tensor([5, 39])
    assert torch.equal(quant_embedding(prepared, ids, torch.float32), dequantize(qw)[ids])
