"""`fornax bench embed` on a tiny embedder with the transformers peer: a valid record."""

from __future__ import annotations

import argparse

from fornax.perf import embed
from fornax.perf.schema import validate_record
from tools.make_tiny_bert import tiny_bert_dir


def test_bench_embed_writes_a_valid_record_with_a_matching_peer(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    embed.add_parser(parser.add_subparsers())
    out = tmp_path / "embed.json"
    args = parser.parse_args(["embed", "--model", str(tiny_bert_dir("bert-embed")), "--peer",
                              "hf", "--num-sentences", "24", "--max-words", "12",
                              "--num-iters", "2", "--output-json", str(out)])
    record = args.func(args)
    assert out.exists() and validate_record(record) == []
    assert record["kind"] == "embed" and record["metrics"]["num_sentences"] == 24
    assert record["peer"]["name"] == "hf-transformers" and len(record["peer"]["iterations"]) == 2
    assert record["ratios"]["sentences_per_s"] > 0
    assert record["details"]["min_cosine_vs_peer"] > 0.9999  # both sides embed alike
