"""Every environment variable fornax reads: type, default and meaning, declared once (any process).

`_DECLARATIONS` is the one list: `NAME: TYPE = DEFAULT`, then the meaning, indented. TYPE is
str, int, float, bool, path or the allowed values (`a|b|c`); DEFAULT is a value of that type, or
`(words)` for a default no value can say (read as unset), or absent (unset). Code reads a variable
through its typed handle below (`env.CACHE.get()`), never through `os.environ`; README.md's table
is `markdown_table()` (tests/unit/test_env_registry.py keeps them equal and finds direct reads;
`python -m fornax.runtime.env` prints the table).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from fornax.runtime.errors import ConfigError

T = TypeVar("T")

_DECLARATIONS = """
## settings
FORNAX_CACHE: path = ~/.cache/fornax
    fornax's cache: prepared GGUF (`gguf/`) and Whisper (`whisper/`) folders, built C kernels
    (`native/`), torch.compile caches (`inductor/`), benchmark shapes (`shapes/`)
FORNAX_LOG_LEVEL: debug|info|warning|warn|error|critical|fatal = info
    log level of every fornax process (`--log-level` sets it for `fornax serve`)
FORNAX_API_KEY: str
    the API key `fornax serve` requires when no `--api-key` is given
VLLM_API_KEY: str
    the same under vLLM's name (`FORNAX_API_KEY` wins)
VLLM_SERVER_DEV_MODE: bool = 0
    1: serve the dev endpoints, as `--enable-dev-endpoints`
FORNAX_ENGINE_DEAD_GRACE_S: float = 2
    seconds `fornax serve` keeps answering 503 after the engine core died, then exits
FORNAX_CPU_LINEAR: auto|onednn|amx = auto
    bf16 linear layers on CPU: AMX tiles for decode-sized batches and oneDNN above (auto), or
    one of them only (perf/README.md)
FORNAX_NATIVE_KERNELS: bool = 1
    0: no C kernels (runtime/kernels/csrc); everything falls back to pure torch
FORNAX_FUSED_DECODE: bool = 1
    0: CPU steps of decodes and small prompt chunks (up to 39 tokens) run the decoder layers op
    by op instead of in one C call (runtime/kernels/fused_decode.py; bf16 activations, weights
    kept quantized or dense bf16), for comparison
FORNAX_GGUF_DEQUANTIZE: bool = 0
    1: a GGUF model's weights are dequantized at load (the path before `--quantization gguf`,
    for comparison) instead of kept quantized; its prepared folder is cached separately
FORNAX_GRAMMAR_PREWARM: bool = 0
    1: the engine core loads xgrammar (with transformers: ~50 MiB resident) right after start-up,
    so the first request with an output constraint does not wait for it (~2 s on a quiet CPU)
CC: str
    the C compiler that builds the native kernels (else gcc, cc, clang)
FORNAX_KERNEL_SANITIZE: str
    testing only: sanitizers the C kernels are built with (`address,undefined`: gcc's
    `-fsanitize=`; cached apart; needs libasan preloaded, tests/kernels/README.md)
FORNAX_FLASHINFER_TENSOR_CORES: bool = (on when a KV head serves two or more query heads)
    1 or 0: FlashInfer's decode on tensor cores or not
FORNAX_FLASHINFER_PREFILL_BACKEND: str = fa2
    FlashInfer's prefill backend (`fa2` is its portable path)
FORNAX_FLASHINFER_DECODE_BACKEND: str = fa2
    FlashInfer's decode backend
FORNAX_FAULT_INJECTION: str
    testing only: faults to inject at engine stages, a JSON object read once at import
    (runtime/engine/fault_injection.py)
TORCHINDUCTOR_CACHE_DIR: str = ($FORNAX_CACHE/inductor)
    torch.compile's on-disk cache; fornax points it into its own cache unless it is set
## the Hugging Face cache (read only: hub ids `org/name` resolve from it; nothing is downloaded)
HF_HUB_CACHE: path = ($HF_HOME/hub)
    a hub cache searched for `org/name` models and tokenizers, after `--download-dir`
HUGGINGFACE_HUB_CACHE: path
    the older name of `HF_HUB_CACHE`, searched after it
TRANSFORMERS_CACHE: path
    transformers' older cache variable, searched after `HF_HUB_CACHE`
HF_HOME: path = ($XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface)
    Hugging Face's home folder: its `hub/` is searched last
XDG_CACHE_HOME: path = (~/.cache)
    where `HF_HOME` is when it is unset
## set by fornax for its own child processes
FORNAX_ENGINE_SPEC: str
    the engine-core process's EngineSpec (JSON), set by its launcher
FORNAX_SERVER_SETTINGS: str
    the API workers' ServerSettings (JSON), set by `fornax serve`
PROMETHEUS_MULTIPROC_DIR: str
    where the API workers' metrics meet (prometheus-client), set by `fornax serve`
## tests, benchmarks and tools
FORNAX_TEST_CACHE: path = (.cache/tiny-models in the checkout)
    where the tests build their tiny checkpoints
FORNAX_KEEP_TEST_LOGS: bool = 0
    1: keep the log files of the test servers (tests/helpers/api_server.py)
FORNAX_BENCH_COMMIT: str
    the commit benchmark results record (else `git rev-parse HEAD`), e.g. for an installed wheel
OMP_NUM_THREADS: int = (all cores)
    CPU threads of torch and the C kernels; benchmarks record it and warn when it is unset
OPENAI_API_KEY: str
    `fornax bench serve`: the default of `--api-key`
"""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_KINDS = ("str", "int", "float", "bool", "path")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable: `get()` parses it (unset or empty: the default), `set()` writes it."""

    name: str
    kind: str  # one of _KINDS, or "choice" (then `choices` holds the allowed values)
    default_text: str | None  # the declared default; "(words)" describes one no value can say
    doc: str
    scope: str
    choices: tuple[str, ...] = ()

    def raw(self) -> str | None:
        """The text as set, or None when unset or empty."""
        return os.environ.get(self.name) or None

    def is_set(self) -> bool:
        return self.raw() is not None

    def get(self) -> T:
        """The typed value; ConfigError naming the variable when the text does not parse."""
        raw = self.raw()
        if raw is None:
            text = self.default_text
            return cast(T, None if text is None or text.startswith("(") else self._parse(text))
        return cast(T, self._parse(raw))

    def set(self, value: str) -> None:
        """Set it in this process (children started afterwards inherit it)."""
        os.environ[self.name] = value

    def _parse(self, raw: str) -> Any:
        text = raw.strip()
        if self.kind == "bool":
            if text.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{self.name} must be 0 or 1 (or true/false), got {raw!r}")
            return text.lower() in _TRUE
        if self.kind == "choice":
            if text.lower() not in self.choices:
                raise ConfigError(f"{self.name} must be one of {', '.join(self.choices)}, "
                                  f"got {raw!r}")
            return text.lower()
        if self.kind == "path":
            return Path(text).expanduser()
        try:
            return {"int": int, "float": float}.get(self.kind, str)(text)
        except ValueError:
            raise ConfigError(f"{self.name} must be a number ({self.kind}), got {raw!r}") from None


def _parse_declarations(text: str) -> dict[str, EnvVar[Any]]:
    out: dict[str, EnvVar[Any]] = {}
    scope = ""
    for line in text.strip().splitlines():
        if line.startswith("## "):
            scope = line[3:]
        elif line.startswith("    "):
            last = out[next(reversed(out))]
            out[last.name] = EnvVar(last.name, last.kind, last.default_text,
                                    f"{last.doc} {line.strip()}".strip(), scope, last.choices)
        else:
            head, _, default = line.partition(" = ")
            name, _, kind = head.partition(": ")
            choices = tuple(kind.split("|")) if "|" in kind else ()
            if name in out or not (choices or kind in _KINDS):
                raise ValueError(f"bad environment declaration: {line!r}")
            out[name] = EnvVar(name, "choice" if choices else kind, default or None, "", scope,
                               choices)
    for var in out.values():  # a declared default must parse
        if var.default_text and not var.default_text.startswith("("):
            var._parse(var.default_text)
    return out


REGISTRY: dict[str, EnvVar[Any]] = _parse_declarations(_DECLARATIONS)
SCOPES = tuple(dict.fromkeys(var.scope for var in REGISTRY.values()))


def _var(name: str) -> Any:
    return REGISTRY[name]


# The typed handles (tests/unit/test_env_registry.py checks each type against its declaration).
CACHE: EnvVar[Path] = _var("FORNAX_CACHE")  # read through loaders/cache_folders.cache_root
LOG_LEVEL: EnvVar[str] = _var("FORNAX_LOG_LEVEL")
API_KEY: EnvVar[str | None] = _var("FORNAX_API_KEY")
VLLM_API_KEY: EnvVar[str | None] = _var("VLLM_API_KEY")
DEV_MODE: EnvVar[bool] = _var("VLLM_SERVER_DEV_MODE")
ENGINE_DEAD_GRACE_S: EnvVar[float] = _var("FORNAX_ENGINE_DEAD_GRACE_S")
CPU_LINEAR: EnvVar[str] = _var("FORNAX_CPU_LINEAR")
NATIVE_KERNELS: EnvVar[bool] = _var("FORNAX_NATIVE_KERNELS")
FUSED_DECODE: EnvVar[bool] = _var("FORNAX_FUSED_DECODE")
GGUF_DEQUANTIZE: EnvVar[bool] = _var("FORNAX_GGUF_DEQUANTIZE")  # read by loaders/model_files.py
GRAMMAR_PREWARM: EnvVar[bool] = _var("FORNAX_GRAMMAR_PREWARM")  # read by engine/process.py
CC: EnvVar[str | None] = _var("CC")
KERNEL_SANITIZE: EnvVar[str | None] = _var("FORNAX_KERNEL_SANITIZE")
FLASHINFER_TENSOR_CORES: EnvVar[bool | None] = _var("FORNAX_FLASHINFER_TENSOR_CORES")
FLASHINFER_PREFILL_BACKEND: EnvVar[str] = _var("FORNAX_FLASHINFER_PREFILL_BACKEND")
FLASHINFER_DECODE_BACKEND: EnvVar[str] = _var("FORNAX_FLASHINFER_DECODE_BACKEND")
FAULT_INJECTION: EnvVar[str | None] = _var("FORNAX_FAULT_INJECTION")
TORCHINDUCTOR_CACHE_DIR: EnvVar[str | None] = _var("TORCHINDUCTOR_CACHE_DIR")
HF_HUB_CACHE: EnvVar[Path | None] = _var("HF_HUB_CACHE")  # read by loaders/hub_cache.py
HUGGINGFACE_HUB_CACHE: EnvVar[Path | None] = _var("HUGGINGFACE_HUB_CACHE")
TRANSFORMERS_CACHE: EnvVar[Path | None] = _var("TRANSFORMERS_CACHE")
HF_HOME: EnvVar[Path | None] = _var("HF_HOME")
XDG_CACHE_HOME: EnvVar[Path | None] = _var("XDG_CACHE_HOME")
ENGINE_SPEC: EnvVar[str | None] = _var("FORNAX_ENGINE_SPEC")
SERVER_SETTINGS: EnvVar[str | None] = _var("FORNAX_SERVER_SETTINGS")
PROMETHEUS_MULTIPROC_DIR: EnvVar[str | None] = _var("PROMETHEUS_MULTIPROC_DIR")
TEST_CACHE: EnvVar[Path | None] = _var("FORNAX_TEST_CACHE")
KEEP_TEST_LOGS: EnvVar[bool] = _var("FORNAX_KEEP_TEST_LOGS")
BENCH_COMMIT: EnvVar[str | None] = _var("FORNAX_BENCH_COMMIT")
OMP_NUM_THREADS: EnvVar[int | None] = _var("OMP_NUM_THREADS")
OPENAI_API_KEY: EnvVar[str | None] = _var("OPENAI_API_KEY")

# Read inside engine steps (kernel loads, FlashInfer plans): `check_engine_variables` parses them
# when an engine core is built, so a bad value refuses to start instead of failing steps later.
ENGINE_VARIABLES: tuple[EnvVar[Any], ...] = (
    CPU_LINEAR, NATIVE_KERNELS, FUSED_DECODE, FLASHINFER_TENSOR_CORES, FLASHINFER_PREFILL_BACKEND,
    FLASHINFER_DECODE_BACKEND, GRAMMAR_PREWARM)


def check_engine_variables() -> None:
    """ConfigError naming the first engine variable whose value does not parse."""
    for var in ENGINE_VARIABLES:
        var.get()


def markdown_table() -> str:
    """README.md's table of variables, scope by scope in declaration order."""
    lines = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for scope in SCOPES:
        lines.append(f"| **{scope}** | | | |")
        for var in (v for v in REGISTRY.values() if v.scope == scope):
            kind = ", ".join(f"`{c}`" for c in var.choices) if var.choices else var.kind
            default = var.default_text
            default = "unset" if default is None else (
                default[1:-1] if default.startswith("(") else f"`{default}`")
            lines.append(f"| `{var.name}` | {kind} | {default} | {var.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
