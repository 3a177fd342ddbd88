"""Seeded tiny random BERT-family checkpoints (embedder, cross-encoders, classifier); a CLI tool.

Run as `python -m tools.make_tiny_bert ARCH OUT_DIR` from the repository root.

Each is an HF folder (config.json, model.safetensors, tokenizer.json with a WordPiece vocabulary
trained on tools/make_tiny_model.py's paragraph) and, for the embedder, sentence-transformers files
(modules.json, 1_Pooling/config.json, Normalize). Built once per (arch, seed) into the test cache.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

from tools.make_tiny_model import TRAINING_TEXT, default_cache_root

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3
MAX_POSITIONS = 128
LABELS = ("negative", "neutral", "positive")

# arch -> (transformers class, extra config)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-embed": ("BertModel", {"matryoshka_dimensions": [8, 16, 32]}),
    "bert-cross": ("BertForSequenceClassification", {"num_labels": 1}),
    "bert-classify": ("BertForSequenceClassification", {
        "id2label": dict(enumerate(LABELS)), "label2id": {v: i for i, v in enumerate(LABELS)}}),
    "roberta-cross": ("XLMRobertaForSequenceClassification", {"num_labels": 1}),
    "roberta-embed": ("RobertaModel", {}),
}


def _train_tokenizer() -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, min_frequency=1,
                                        special_tokens=list(SPECIALS), show_progress=False)
    lines = TRAINING_TEXT.splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    return tok


def _config(arch: str, vocab_size: int) -> Any:
    import transformers

    cls_name, extra = ARCHS[arch]
    roberta = "Roberta" in cls_name
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "max_position_embeddings": MAX_POSITIONS + (PAD_ID + 1 if roberta else 0),
        "type_vocab_size": 1 if roberta else 2, "pad_token_id": PAD_ID, "layer_norm_eps": 1e-12,
        **extra}
    config_cls = transformers.XLMRobertaConfig if roberta else transformers.BertConfig
    config = config_cls(**kwargs)
    config.architectures = [cls_name]
    return config


def _init(model: Any, seed: int) -> None:
    """Every parameter from its own seeded generator: std 0.5 for matrices (so hidden states and
    scores vary clearly between inputs), LayerNorm weights around 1."""
    import torch

    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.randn(param.shape, generator=gen)
            if "LayerNorm" in name and name.endswith("weight"):
                values = 1.0 + 0.1 * values
            elif name.endswith("bias"):
                values = 0.1 * values
            else:
                values = values * (0.5 if param.dim() == 1 else param.shape[-1] ** -0.5 * 1.5)
            param.copy_(values)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_bert(arch: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint `arch` into `out_dir`; one (arch, seed) gives the same files."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = _config(arch, vocab)
    model_cls = getattr(transformers, ARCHS[arch][0])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _init(model, seed)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(out)
    _write_json(out / "config.json", json.loads((out / "config.json").read_text()))
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length":
        MAX_POSITIONS, "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]"})
    if arch == "bert-embed":
        _write_json(out / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}])
        _write_json(out / "1_Pooling" / "config.json", {
            "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False})
        _write_json(out / "sentence_bert_config.json", {"max_seq_length": 64,
                                                        "do_lower_case": False})
    logger.info("built tiny %s (seed %d, vocab %d) in %s", arch, seed, vocab, out)
    return out


def _fingerprint() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(str(GENERATOR_VERSION).encode())
    for dist in ("transformers", "tokenizers", "torch", "safetensors"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=none".encode())
    return digest.hexdigest()[:10]


def tiny_bert_dir(arch: str, *, seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """A cached checkpoint dir for (arch, seed), built once; a build lands by an atomic rename."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny BERT arch {arch!r}; one of {', '.join(ARCHS)}")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"{arch}-seed{seed}-{_fingerprint()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_bert(arch, tmp, seed=seed)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_tiny_bert(args.arch, args.out_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
