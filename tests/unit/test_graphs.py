"""graphs/: bucket policy, and the compiled forward giving eager's greedy tokens."""

from __future__ import annotations

import pytest

from fornax.graphs.buckets import bucket_for, capture_sizes
from fornax.runtime import SamplingParams


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
