"""Every environment variable fornax reads: type, default and meaning, declared once (any process).

Code reads a variable through its `EnvVar` here (`env.CACHE.get()`), never through
`os.environ` directly; README.md's table of variables is `markdown_table()` (a test keeps the
two equal; `python -m fornax.runtime.env` prints it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from fornax.runtime.errors import ConfigError

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# who a variable is for, in the README table's order
SCOPES = {"user": "settings", "internal": "set by fornax for its own child processes",
          "dev": "tests, benchmarks and tools"}


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable: `get()` parses it (unset or empty: the default), `set()` writes it."""

    name: str
    kind: str  # str | int | float | bool | path
    default: T
    doc: str
    scope: str = "user"
    choices: tuple[str, ...] = ()  # str kinds: the allowed values (compared case-insensitively)
    default_doc: str | None = None  # the README's text for the default, when not str(default)

    def raw(self) -> str | None:
        """The text as set, or None when unset or empty."""
        return os.environ.get(self.name) or None

    def is_set(self) -> bool:
        return self.raw() is not None

    def get(self) -> T:
        """The typed value; ConfigError naming the variable when the text does not parse."""
        raw = self.raw()
        if raw is None:
            return self.default
        return cast(T, self._parse(raw))

    def set(self, value: str) -> None:
        """Set it in this process (children started afterwards inherit it)."""
        os.environ[self.name] = value

    def _parse(self, raw: str) -> Any:
        text = raw.strip()
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "path":
                return Path(text).expanduser()
        except ValueError as exc:
            raise ConfigError(f"{self.name}: not a valid {self.kind}: {raw!r}") from exc
        if self.kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ConfigError(f"{self.name} must be 0 or 1 (or true/false), got {raw!r}")
        if self.choices:
            folded = {c.lower(): c for c in self.choices}
            if text.lower() not in folded:
                raise ConfigError(f"{self.name} must be one of {', '.join(self.choices)}, "
                                  f"got {raw!r}")
            return folded[text.lower()]
        return raw


REGISTRY: dict[str, EnvVar[Any]] = {}


def _declare(var: EnvVar[T]) -> EnvVar[T]:
    if var.name in REGISTRY:
        raise ValueError(f"{var.name} is declared twice")
    REGISTRY[var.name] = var
    return var


# ---- settings ----------------------------------------------------------------------------------
CACHE: EnvVar[Path | None] = _declare(EnvVar(  # read through loaders/cache_folders.cache_root
    "FORNAX_CACHE", "path", None,
    "fornax's cache: prepared GGUF (`gguf/`) and Whisper (`whisper/`) folders, built C kernels "
    "(`native/`), torch.compile caches (`inductor/`), benchmark shapes (`shapes/`)",
    default_doc="`~/.cache/fornax`"))
LOG_LEVEL: EnvVar[str] = _declare(EnvVar(
    "FORNAX_LOG_LEVEL", "str", "INFO",
    "log level of every fornax process (`--log-level` sets it for `fornax serve`)",
    choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")))
API_KEY: EnvVar[str | None] = _declare(EnvVar(
    "FORNAX_API_KEY", "str", None,
    "the API key `fornax serve` requires when no `--api-key` is given"))
VLLM_API_KEY: EnvVar[str | None] = _declare(EnvVar(
    "VLLM_API_KEY", "str", None, "the same under vLLM's name (`FORNAX_API_KEY` wins)"))
DEV_MODE: EnvVar[bool] = _declare(EnvVar(
    "VLLM_SERVER_DEV_MODE", "bool", False,
    "1: serve the dev endpoints, as `--enable-dev-endpoints` (vLLM's name)"))
ENGINE_DEAD_GRACE_S: EnvVar[float] = _declare(EnvVar(
    "FORNAX_ENGINE_DEAD_GRACE_S", "float", 2.0,
    "seconds `fornax serve` keeps answering 503 after the engine core died, then exits"))
CPU_LINEAR: EnvVar[str] = _declare(EnvVar(
    "FORNAX_CPU_LINEAR", "str", "auto",
    "bf16 linear layers on CPU: `auto` (AMX tiles for decode-sized batches, oneDNN above), "
    "`onednn` or `amx` only (perf/README.md)", choices=("auto", "onednn", "amx")))
NATIVE_KERNELS: EnvVar[bool] = _declare(EnvVar(
    "FORNAX_NATIVE_KERNELS", "bool", True,
    "0: no C kernels (runtime/kernels/csrc); everything falls back to pure torch",
    default_doc="1"))
CC: EnvVar[str | None] = _declare(EnvVar(
    "CC", "str", None, "the C compiler that builds the native kernels (else gcc, cc, clang)"))
FLASHINFER_TENSOR_CORES: EnvVar[bool | None] = _declare(EnvVar(
    "FORNAX_FLASHINFER_TENSOR_CORES", "bool", None,
    "1/0: FlashInfer decode on tensor cores or not", default_doc="on when a KV head serves "
    "two or more query heads"))
FLASHINFER_PREFILL_BACKEND: EnvVar[str] = _declare(EnvVar(
    "FORNAX_FLASHINFER_PREFILL_BACKEND", "str", "fa2",
    "FlashInfer's prefill backend (`fa2` is its portable path)"))
FLASHINFER_DECODE_BACKEND: EnvVar[str] = _declare(EnvVar(
    "FORNAX_FLASHINFER_DECODE_BACKEND", "str", "fa2", "FlashInfer's decode backend"))
FAULT_INJECTION: EnvVar[str | None] = _declare(EnvVar(
    "FORNAX_FAULT_INJECTION", "str", None,
    "testing: inject faults at engine stages, a JSON object read once at import "
    "(runtime/engine/fault_injection.py)"))
TORCHINDUCTOR_CACHE_DIR: EnvVar[str | None] = _declare(EnvVar(
    "TORCHINDUCTOR_CACHE_DIR", "str", None,
    "torch.compile's on-disk cache; fornax sets it to `$FORNAX_CACHE/inductor` unless set",
    default_doc="`$FORNAX_CACHE/inductor`"))

# ---- set by fornax for its own processes ----------------------------------------------------------
ENGINE_SPEC: EnvVar[str | None] = _declare(EnvVar(
    "FORNAX_ENGINE_SPEC", "str", None,
    "the engine-core process's EngineSpec (JSON), set by its launcher", scope="internal"))
SERVER_SETTINGS: EnvVar[str | None] = _declare(EnvVar(
    "FORNAX_SERVER_SETTINGS", "str", None,
    "the API workers' ServerSettings (JSON), set by `fornax serve`", scope="internal"))
PROMETHEUS_MULTIPROC_DIR: EnvVar[str | None] = _declare(EnvVar(
    "PROMETHEUS_MULTIPROC_DIR", "str", None,
    "where the API workers' metrics meet (prometheus-client), set by `fornax serve`",
    scope="internal"))

# ---- tests, benchmarks, tools ------------------------------------------------------------------
TEST_CACHE: EnvVar[Path | None] = _declare(EnvVar(
    "FORNAX_TEST_CACHE", "path", None, "where the tests' tiny checkpoints are built",
    scope="dev", default_doc="`.cache/tiny-models` in the checkout"))
KEEP_TEST_LOGS: EnvVar[bool] = _declare(EnvVar(
    "FORNAX_KEEP_TEST_LOGS", "bool", False,
    "1: keep the log files of the test servers (tests/helpers/api_server.py)", scope="dev"))
BENCH_COMMIT: EnvVar[str | None] = _declare(EnvVar(
    "FORNAX_BENCH_COMMIT", "str", None,
    "the commit benchmark results record (else `git rev-parse HEAD`; e.g. for an installed wheel)",
    scope="dev"))
OMP_NUM_THREADS: EnvVar[int | None] = _declare(EnvVar(
    "OMP_NUM_THREADS", "int", None,
    "CPU threads of torch and the C kernels; benchmarks record it and warn when it is unset",
    scope="dev", default_doc="all cores"))
OPENAI_API_KEY: EnvVar[str | None] = _declare(EnvVar(
    "OPENAI_API_KEY", "str", None, "`fornax bench serve`: the default of `--api-key`",
    scope="dev"))


def markdown_table() -> str:
    """README.md's table of variables (scope by scope, in declaration order)."""
    lines = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for scope, title in SCOPES.items():
        lines.append(f"| **{title}** | | | |")
        for var in REGISTRY.values():
            if var.scope != scope:
                continue
            default = var.default_doc or ("unset" if var.default is None else f"`{var.default}`")
            if var.kind == "bool" and var.default_doc is None and var.default is not None:
                default = "1" if var.default else "0"
            kind = ", ".join(f"`{c.lower()}`" for c in var.choices) if var.choices else var.kind
            lines.append(f"| `{var.name}` | {kind} | {default} | {var.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
