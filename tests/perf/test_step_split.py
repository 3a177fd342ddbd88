"""`python -m fornax.perf.step_split` on a tiny model: every phase timed, nested phases within
their parent, the ATen split present, the record valid, and the engine unwrapped afterwards."""

from __future__ import annotations

import json

from fornax.perf import step_split
from fornax.perf.schema import validate_record


def test_step_split_times_every_phase_and_unwraps(tiny_model, tmp_path, monkeypatch) -> None:
    from fornax.runtime import LLM

    built = []
    real_llm = LLM

    def keep(*args, **kwargs):  # the engine the tool builds, to check it is unwrapped after
        llm = real_llm(*args, **kwargs)
        built.append(llm.engine)
        return llm

    monkeypatch.setattr("fornax.runtime.LLM", keep)
    out = tmp_path / "split.json"
    assert step_split.main(["--model", str(tiny_model("llama")), "--dtype", "float32",
                            "--steps", "6", "--warmup", "2", "--profile-steps", "2",
                            "--input-len", "20", "--max-model-len", "256",
                            "--output-json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert validate_record(rec) == []
    m = rec["metrics"]
    for label, _, _ in step_split._PHASES:
        assert m[f"{label}_ms"] > 0, label
    assert m["forward_ms"] <= m["execute_model_ms"] <= m["step_ms"]
    assert m["compute_logits_ms"] <= m["sample_ms"] <= m["execute_model_ms"]
    assert m["top_level_ops_per_step"] > 0 and m["aten_ms_per_step"] > 0
    assert m["detokenize_us"] > 0
    engine = built[0]
    for _, path, attr in step_split._PHASES:  # no wrapper left on any instance
        owner = step_split._resolve(engine, path)
        assert getattr(getattr(owner, attr), "__name__", "") != "timed", attr
