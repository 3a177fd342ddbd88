"""Seeded tiny random BERT-family checkpoints (embedder, cross-encoders, classifier); a CLI tool.

Run as `python -m tools.make_tiny_bert ARCH OUT_DIR` from the repository root.

Each is an HF folder (config.json, model.safetensors, tokenizer.json with a WordPiece vocabulary
trained on tools/tiny_checkpoint.py's paragraph) and, for the embedder, sentence-transformers files
(modules.json, 1_Pooling/config.json, Normalize). Built once per (arch, seed) into the test cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tools.tiny_checkpoint import (
    TRAINING_TEXT,
    cached_checkpoint,
    cli,
    init_parameters,
    write_json,
)

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
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece()
    trainer = tk.trainers.WordPieceTrainer(vocab_size=400, min_frequency=1,
                                           special_tokens=list(SPECIALS), show_progress=False)
    lines = TRAINING_TEXT.splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = tk.processors.TemplateProcessing(
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

    def values(name: str, param: Any, noise: Any) -> Any:
        if "LayerNorm" in name and name.endswith("weight"):
            return 1.0 + 0.1 * noise
        if name.endswith("bias"):
            return 0.1 * noise
        return noise * (0.5 if param.dim() == 1 else param.shape[-1] ** -0.5 * 1.5)

    init_parameters(model, seed, values)


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
    write_json(out / "config.json", json.loads((out / "config.json").read_text()))
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length":
        MAX_POSITIONS, "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]"})
    if arch == "bert-embed":
        write_json(out / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}])
        write_json(out / "1_Pooling" / "config.json", {
            "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False})
        write_json(out / "sentence_bert_config.json", {"max_seq_length": 64,
                                                        "do_lower_case": False})
    logger.info("built tiny %s (seed %d, vocab %d) in %s", arch, seed, vocab, out)
    return out


def tiny_bert_dir(arch: str, *, seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """A cached checkpoint dir for (arch, seed), built once; a build lands by an atomic rename."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny BERT arch {arch!r}; one of {', '.join(ARCHS)}")
    return cached_checkpoint(__file__, GENERATOR_VERSION, arch, seed, cache_root,
                             build_tiny_bert)


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, ARCHS, build_tiny_bert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
