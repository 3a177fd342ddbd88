"""`fornax bench structured` end to end on a tiny model: the JSON record and what it measured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers.bench import run_bench


def test_structured_bench_record(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    rec = run_bench(tmp_path, "structured", "--model", str(tiny_model("llama")),
                    "--batch-size", "3", "--output-len", "6", "--num-iters-warmup", "1",
                    "--num-iters", "2", "--max-model-len", "256", "--disable-tqdm")
    runs = rec["details"]["iterations"]
    assert len(runs["free"]) == len(runs["json"]) == 2
    for run in runs["json"] + runs["free"]:
        assert run["num_output_tokens"] == 3 * 6 and run["finish_reasons"] == ["length"]
    assert all(t.startswith("{") for run in runs["json"] for t in run["texts"])  # constrained
    assert rec["ratios"]["json_over_free_tpot"] == rec["metrics"]["json_tpot_ms"] / \
        rec["metrics"]["free_tpot_ms"]
    assert rec["startup"]["grammar_compile_s"] > 0
