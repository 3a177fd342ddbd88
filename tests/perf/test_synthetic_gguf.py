"""tools/make_synthetic_gguf.py: the tiny shape's file (types, copied tokenizer), written once, served."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_synthetic_gguf_written_once_and_loads(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from fornax.runtime.loaders.default_model import default_model_path
    from tools.make_synthetic_gguf import SHAPES, ensure_synthetic_gguf, synthetic_gguf_path

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))  # the loader's prepared folder
    path = ensure_synthetic_gguf("Q4_0", "tiny", cache=tmp_path / "cache")
    assert path == synthetic_gguf_path("Q4_0", "tiny", tmp_path / "cache")
    written = path.stat().st_mtime_ns
    assert ensure_synthetic_gguf("Q4_0", "tiny", cache=tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == written  # the second call did not rewrite it
    assert not path.with_name(path.name + ".tmp").exists()

    dims = SHAPES["tiny"]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["blk.1.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied
    assert len([n for n in types if n.endswith("attn_q.weight")]) == dims["layers"]
    assert reader.fields["llama.attention.head_count_kv"].contents() == dims["kv_heads"]
    source = gguf.GGUFReader(default_model_path())
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert reader.fields[key].contents() == source.fields[key].contents()
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152

    from fornax.runtime.offline.llm import LLM
    from fornax.runtime.sampling.params import SamplingParams

    llm = LLM(str(path), max_model_len=256)
    out = llm.generate(["The capital of France is"],
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="quant must be one of"):
        ensure_synthetic_gguf("Q5_K", "tiny", cache=tmp_path / "cache")
