"""graphs/: bucket policy, and the compiled forward giving eager's greedy tokens."""

from __future__ import annotations

import weakref

import pytest
import torch

from fornax.graphs.buckets import bucket_for, capture_sizes
from fornax.runtime import SamplingParams
from helpers.kv_compare import assert_step_writes_match, decode_batch


def test_default_capture_sizes_follow_the_design() -> None:
    assert capture_sizes(None, 256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(None, 40) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(None, 5) == [1, 2, 4]
    assert capture_sizes((64, 3, 3, 1000), 128) == [3, 64]  # deduped, sorted, capped
    assert capture_sizes(None, 1024, max_capture_size=64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_bucket_lookup() -> None:
    sizes = capture_sizes(None, 64)
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    assert bucket_for(65, sizes) is None  # past the largest bucket: run eagerly


@pytest.mark.slow
def test_compiled_forward_gives_eager_greedy_tokens(make_llm) -> None:
    prompts = ["Hello world", "The quick brown fox jumps", "1 2 3", "x"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = make_llm("llama", enforce_eager=True)
    compiled = make_llm("llama", enforce_eager=False)
    assert compiled.engine.runner.compiled and not eager.engine.runner.compiled
    assert compiled.engine.compile_seconds > 0
    ours = [o.outputs[0].token_ids for o in compiled.generate(prompts, params)]
    assert ours == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]

    # one decode step of 5 rows over random contexts: compiled vs eager forward write the same
    # slots (the GPU graph tests' check, kv_compare, exercised here on the CPU compiled forward)
    runner = compiled.engine.runner
    with torch.inference_mode():
        for layer_cache in runner.kv_caches:
            layer_cache.copy_(torch.randn_like(layer_cache))
        common = decode_batch(runner, 5, seed=5)
        slots = runner.slot_mapping[:5].clone()
        ids, pos = runner.input_ids[:5].clone(), runner.positions[:5].clone()
        eager_caches = [c.clone() for c in runner.kv_caches]
        expected = runner.model.forward(ids, pos, eager_caches,
                                        runner.backend.build_metadata(common))
        got = runner.forward_fn(ids, pos, runner.kv_caches, runner.backend.build_metadata(common))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert_step_writes_match(runner.kv_caches, eager_caches, slots)
    with torch.inference_mode():
        eager_caches[0][1, 0, 0, 0, 0] += 1.0  # a write outside the step's slots is caught
    with pytest.raises(AssertionError, match="outside the step's slots"):
        assert_step_writes_match(runner.kv_caches, eager_caches, slots)


def test_compile_lifts_the_recompile_limit(monkeypatch) -> None:
    import torch._dynamo.config as dynamo_config

    from fornax.graphs.compile import RECOMPILE_LIMIT, raise_recompile_limit

    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    raise_recompile_limit()
    assert dynamo_config.recompile_limit == RECOMPILE_LIMIT > 8
    monkeypatch.setattr(dynamo_config, "recompile_limit", 1000)
    raise_recompile_limit()  # never lowers a limit the user raised further
    assert dynamo_config.recompile_limit == 1000


def test_close_frees_the_engine_at_once(make_llm) -> None:
    llm = make_llm("llama")
    model = weakref.ref(llm.engine.runner.model)
    cache = weakref.ref(llm.engine.runner.kv_caches[0])
    llm.generate(["free me"], SamplingParams(max_tokens=2))
    llm.close()
    assert model() is None and cache() is None  # no reference cycle kept them alive
    llm.close()  # idempotent
