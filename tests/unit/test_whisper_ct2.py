"""CTranslate2 Whisper files: our reader and converter against a writer of the documented layout."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fornax.runtime.errors import ModelLoadError
from fornax.runtime.loaders.ct2_whisper import read_ct2_model, whisper_state_dict
from fornax.runtime.loaders.speech_models import prepare_ct2_whisper, resolve_speech_model
from helpers.whisper_fixtures import (
    one_thread,  # noqa: F401 - module fixture, used below
    packaged_whisper,
    tiny_whisper_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")


_DTYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
              np.dtype("float16"): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
              version: int = 6) -> None:
    """CTranslate2's model.bin layout (binary version 6, as its Python `ModelSpec.save`)."""
    out = [struct.pack("<I", version), _string("WhisperSpec"), struct.pack("<I", 3),
           struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.ascontiguousarray(value)
        out += [_string(name), struct.pack("<B", value.ndim),
                *(struct.pack("<I", d) for d in value.shape),
                struct.pack("<B", _DTYPE_IDS[value.dtype]), struct.pack("<I", value.nbytes),
                value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def hf_to_ct2(sd: dict[str, np.ndarray], num_heads: int, dtype=np.float16) -> dict[str, np.ndarray]:
    """What CTranslate2's converter writes for an HF Whisper (fused QKV, fused cross KV)."""
    v: dict[str, np.ndarray] = {"encoder/num_heads": np.array(num_heads, np.int16),
                                "decoder/num_heads": np.array(num_heads, np.int16)}

    def put(name, arr):
        v[name] = arr.astype(dtype) if arr.dtype.kind == "f" else arr

    def lin(src, dst, bias=True):
        put(f"{dst}/weight", sd[f"{src}.weight"])
        if bias:
            put(f"{dst}/bias", sd[f"{src}.bias"])

    def norm(src, dst):
        put(f"{dst}/gamma", sd[f"{src}.weight"])
        put(f"{dst}/beta", sd[f"{src}.bias"])

    def fused(src, dst, parts):
        put(f"{dst}/weight", np.concatenate([sd[f"{src}.{p}.weight"] for p in parts]))
        put(f"{dst}/bias", np.concatenate([sd.get(f"{src}.{p}.bias", np.zeros(
            sd[f"{src}.{p}.weight"].shape[0], np.float32)) for p in parts]))

    for i in (1, 2):
        lin(f"model.encoder.conv{i}", f"encoder/conv{i}")
    put("encoder/position_encodings/encodings", sd["model.encoder.embed_positions.weight"])
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    put("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    put("decoder/position_encodings/encodings", sd["model.decoder.embed_positions.weight"])
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for side in ("encoder", "decoder"):
        i = 0
        while f"model.{side}.layers.{i}.fc1.weight" in sd:
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{src}.self_attn", f"{dst}/self_attention/linear_0", ("q_proj", "k_proj",
                                                                         "v_proj"))
            lin(f"{src}.self_attn.out_proj", f"{dst}/self_attention/linear_1")
            norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention/layer_norm")
            if side == "decoder":
                lin(f"{src}.encoder_attn.q_proj", f"{dst}/attention/linear_0")
                fused(f"{src}.encoder_attn", f"{dst}/attention/linear_1", ("k_proj", "v_proj"))
                lin(f"{src}.encoder_attn.out_proj", f"{dst}/attention/linear_2")
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/attention/layer_norm")
            lin(f"{src}.fc1", f"{dst}/ffn/linear_0")
            lin(f"{src}.fc2", f"{dst}/ffn/linear_1")
            norm(f"{src}.final_layer_norm", f"{dst}/ffn/layer_norm")
            i += 1
    return v


@pytest.fixture(scope="module")
def tiny_hf():
    from transformers import WhisperForConditionalGeneration

    path = tiny_whisper_dir()
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    return path, model, sd


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reader_and_converter_recover_the_hf_tensors(tmp_path, tiny_hf, dtype):
    _, model, sd = tiny_hf
    write_ct2(tmp_path / "model.bin", hf_to_ct2(sd, model.config.encoder_attention_heads, dtype),
              {"decoder/projection/weight": "decoder/embeddings/weight"})
    ct2 = read_ct2_model(tmp_path / "model.bin")
    assert ct2.spec_name == "WhisperSpec" and ct2.binary_version == 6
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    got = whisper_state_dict(ct2)
    assert set(got) == set(sd)  # every HF tensor, K projections without bias, no proj_out
    for name, ref in sd.items():
        np.testing.assert_array_equal(got[name], ref.astype(dtype).astype(np.float32), name)


def test_prepared_folder_loads_in_hf_and_matches_the_original(tmp_path, tiny_hf, monkeypatch):
    from transformers import WhisperForConditionalGeneration

    path, model, sd = tiny_hf
    src = tmp_path / "ct2"
    src.mkdir()
    write_ct2(src / "model.bin", hf_to_ct2(sd, 4, np.float32),
              {"decoder/projection/weight": "decoder/embeddings/weight"})
    shutil.copy(path / "tokenizer.json", src / "tokenizer.json")
    (src / "config.json").write_text(json.dumps({"suppress_ids": [1, 2],
                                                 "suppress_ids_begin": [220, 50256]}))
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    prepared = resolve_speech_model(str(src))
    assert prepared is not None and prepared == prepare_ct2_whisper(src, src / "model.bin")
    again = WhisperForConditionalGeneration.from_pretrained(prepared, dtype=torch.float32).eval()
    feats = torch.randn(1, 80, 300)
    ids = torch.tensor([[50257, 50362, 383]])
    with torch.inference_mode():
        a = model(input_features=feats, decoder_input_ids=ids).logits
        b = again(input_features=feats, decoder_input_ids=ids).logits
    torch.testing.assert_close(a, b)
    cfg = json.loads((prepared / "config.json").read_text())
    assert cfg["suppress_tokens"] == [1, 2] and cfg["decoder_start_token_id"] == 50257


def test_corrupt_and_foreign_files_are_load_errors(tmp_path, tiny_hf):
    _, _, sd = tiny_hf
    good = tmp_path / "good.bin"
    write_ct2(good, hf_to_ct2(sd, 4), {})
    data = good.read_bytes()
    cases = {"truncated.bin": data[: len(data) // 2], "empty.bin": b"",
             "version.bin": struct.pack("<I", 99) + data[4:], "text.bin": b"hello " * 100}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError):
            whisper_state_dict(read_ct2_model(tmp_path / name))
    with pytest.raises(ModelLoadError):
        read_ct2_model(tmp_path / "missing.bin")


@pytest.mark.slow
def test_packaged_models_convert_with_their_real_shapes():
    tiny = json.loads((packaged_whisper("whisper-tiny.en") / "config.json").read_text())
    assert (tiny["d_model"], tiny["encoder_layers"], tiny["decoder_layers"],
            tiny["decoder_attention_heads"], tiny["vocab_size"]) == (384, 4, 4, 6, 51864)
    base_dir = packaged_whisper("whisper-base")
    base = json.loads((base_dir / "config.json").read_text())
    assert (base["d_model"], base["encoder_layers"], base["vocab_size"]) == (512, 6, 51865)
    gen = json.loads((base_dir / "generation_config.json").read_text())
    assert gen["is_multilingual"] and gen["lang_to_id"]["<|de|>"] == 50261
    assert resolve_speech_model("openai/whisper-base") == base_dir
