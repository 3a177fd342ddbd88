"""What both tiny-checkpoint makers share: training text, seeded init, cached builds (CLI tool)."""

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fornax.runtime import env

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The libraries whose output lands in the checkpoint files (their versions are in every cache key).
_KEYED_DISTS = ("transformers", "tokenizers", "torch", "safetensors")

# Both tokenizers (byte-level BPE and WordPiece) are trained on this paragraph.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.
Once upon a time, in a small village by the sea, there lived an old fisherman who told stories
about the stars, the tides and the strange lights that danced over the water on winter nights.
Every morning he walked down to the harbour, checked his nets, and greeted the other fishermen.
"What is the capital of France?" asked the child. "Paris," said her mother, "and the capital of
Italy is Rome, of Spain is Madrid, of Germany is Berlin, and of Japan is Tokyo."
Hello! How are you today? I'm fine, thank you. Could you help me write a short poem about autumn
leaves, rain on the window, and a warm cup of tea? Sure, here it is: golden leaves are falling down,
softly covering the town; rain is tapping on the glass, waiting for the storm to pass.
The inference server schedules requests in batches, stores keys and values in a paged cache, and
streams tokens back to the client as soon as they are sampled. Latency, throughput and memory are
the three numbers that matter; everything else is a detail of the implementation.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 3.14159 2.71828 -7 1e-5 0x1F 2024-06-01
Math: 2 + 2 = 4, 3 * 7 = 21, 10 / 4 = 2.5, 2 ** 10 = 1024, (a + b) * c >= 0, x != y.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids

{"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.0}
<html><body><p>Tokens &amp; text, URLs like https://example.com/a?q=1, a@b.io</p></body></html>
SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;
"""


def default_cache_root() -> Path:
    """Where built checkpoints are kept: $FORNAX_TEST_CACHE, else the repo's .cache/tiny-models."""
    return env.TEST_CACHE.get() or REPO_ROOT / ".cache" / "tiny-models"


def write_json(path: Path, data: Any) -> None:
    """Sorted, indented JSON, so a file's bytes depend only on its content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def init_parameters(model: Any, seed: int, values: Callable[[str, Any, Any], Any]) -> None:
    """Set every parameter to `values(name, param, noise)`, where noise is N(0, 1) drawn from a
    generator seeded by (seed, name): the result does not depend on the parameters' order."""
    import torch

    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_(values(name, param, noise))


def fingerprint(maker: str | Path, version: int) -> str:
    """A cache key part: the hash of the maker's source and this module's (both shape the
    files), the generator version, and the versions of the libraries that write them."""
    digest = hashlib.sha256(Path(maker).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(str(version).encode())
    for dist in _KEYED_DISTS:
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=none".encode())
    return digest.hexdigest()[:10]


def cached_checkpoint(maker: str | Path, version: int, arch: str, seed: int,
                      cache_root: str | Path | None, build: Callable[..., object]) -> Path:
    """The checkpoint dir of (arch, seed), running `build(arch, tmp_dir, seed=seed)` first if it
    is not cached yet; safe under races.

    The dir's name holds the generator version and `fingerprint(maker, version)`. A build goes
    into a temporary sibling dir that is renamed into place (atomic), so a reader never sees a
    half-written checkpoint and concurrent builders agree on one result.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"{arch}-seed{seed}-v{version}-{fingerprint(maker, version)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(arch, tmp, seed=seed)
        tmp.chmod(0o755)  # mkdtemp made it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a failure other than "someone else finished first"
                raise
            logger.debug("another process built %s first", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cli(doc: str | None, archs: Sequence[str], build: Callable[..., Path],
        argv: list[str] | None) -> int:
    """`ARCH OUT_DIR [--seed N]`: build one checkpoint and print its folder."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("arch", choices=sorted(archs))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build(args.arch, args.out_dir, seed=args.seed))
    return 0
