"""One source of truth: the environment registry, the cache root, CLI defaults from the configs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import msgspec
import pytest

from fornax.api.server import args as serve_args
from fornax.api.server.settings import ServerSettings
from fornax.runtime import env
from fornax.runtime.config import engine_field, field_default, make_engine_config
from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.loaders.cache_folders import cache_root

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("api", "runtime", "audio", "graphs", "perf", "tools", "tests")
# a read of a variable, not a copy of the whole environment for a child process
DIRECT_READ = re.compile(r"os\.getenv\(|os\.environ\.get\(|os\.environ\[|environ\.setdefault\(")
STANDALONE = {"tools/realtime_captions.py"}  # a client script that runs without fornax installed
_KIND_TYPES = {"str": str, "choice": str, "int": int, "float": float, "bool": bool, "path": Path}


def _python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]


def test_readme_table_is_the_registry():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- env-table:start -->\n")[1].split("<!-- env-table:end -->")[0]
    assert block == env.markdown_table(), "regenerate with `python -m fornax.runtime.env`"


def test_code_reads_variables_only_through_the_registry():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in _python_files("api", "runtime", "audio",
                                                                     "graphs", "perf", "tools",
                                                                     "tests/helpers")
                 if p.name != "env.py" and str(p.relative_to(REPO)) not in STANDALONE
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if DIRECT_READ.search(line)]
    assert not offenders, f"read through fornax.runtime.env instead: {offenders}"


def test_every_fornax_variable_named_in_the_code_is_declared():
    named = {m for p in _python_files(*CODE_DIRS)
             for m in re.findall(r"\bFORNAX_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(encoding="utf-8"))}
    assert named, "the scan found nothing: the pattern is broken"
    assert not named - set(env.REGISTRY), "declare these in runtime/env.py"


def test_handles_have_the_declared_types():
    hints = typing.get_type_hints(env)
    handles = {name: getattr(env, name) for name, hint in hints.items()
               if typing.get_origin(hint) is env.EnvVar}
    assert {var.name for var in handles.values()} == set(env.REGISTRY), "a variable lacks a handle"
    for name, var in handles.items():
        (value_type,) = typing.get_args(hints[name])
        unset_default = var.default_text is None or var.default_text.startswith("(")
        expected = _KIND_TYPES[var.kind] | None if unset_default else _KIND_TYPES[var.kind]
        assert value_type == expected, (name, value_type, expected)


def test_parsing_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("FORNAX_NATIVE_KERNELS", raising=False)
    assert env.NATIVE_KERNELS.get() is True
    for text, value in (("0", False), ("false", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("FORNAX_NATIVE_KERNELS", text)
        assert env.NATIVE_KERNELS.get() is value
    monkeypatch.setenv("FORNAX_NATIVE_KERNELS", "")  # empty is unset
    assert env.NATIVE_KERNELS.get() is True
    monkeypatch.setenv("FORNAX_NATIVE_KERNELS", "maybe")
    with pytest.raises(ConfigError, match="FORNAX_NATIVE_KERNELS"):
        env.NATIVE_KERNELS.get()
    monkeypatch.setenv("FORNAX_CPU_LINEAR", " AMX ")
    assert env.CPU_LINEAR.get() == "amx"
    monkeypatch.setenv("FORNAX_CPU_LINEAR", "fast")
    with pytest.raises(ConfigError, match="FORNAX_CPU_LINEAR must be one of auto, onednn, amx"):
        env.CPU_LINEAR.get()
    monkeypatch.setenv("FORNAX_ENGINE_DEAD_GRACE_S", "soon")
    with pytest.raises(ConfigError, match="FORNAX_ENGINE_DEAD_GRACE_S"):
        env.ENGINE_DEAD_GRACE_S.get()
    monkeypatch.delenv("FORNAX_ENGINE_DEAD_GRACE_S")
    assert env.ENGINE_DEAD_GRACE_S.get() == 2.0
    monkeypatch.delenv("FORNAX_FLASHINFER_TENSOR_CORES", raising=False)
    assert env.FLASHINFER_TENSOR_CORES.get() is None  # a described default: decided by the code


def test_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FORNAX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fornax"
    monkeypatch.setenv("FORNAX_CACHE", "~/elsewhere")
    assert cache_root() == tmp_path / "home" / "elsewhere"
    assert cache_root(tmp_path / "given") == tmp_path / "given"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_args.add_serve_arguments(parser)
    return parser.parse_args(argv)


def _help_of(flag: str) -> str:
    parser = argparse.ArgumentParser()
    serve_args.add_serve_arguments(parser)
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join(str(action.help).split())


def test_engine_flag_defaults_and_help_come_from_the_config_fields():
    assert serve_args.engine_kwargs(_parse([])) == {}  # not given: the config's own default
    for names, field, _ in serve_args._QUEUE_FLAGS + serve_args._ENGINE_FLAGS:
        f = engine_field(field)
        text = _help_of(names[0])
        assert text.startswith(" ".join(f.metadata["help"].split())), names[0]
        default = field_default(f)
        if f.metadata["shown"]:
            assert f"(default: {f.metadata['shown']})" in text
        elif default is not None:
            assert f"(default: {serve_args._show(default)})" in text, (names[0], text)
        if f.metadata["choices"] and "action" not in _:
            assert _parse([names[0], f.metadata["choices"][-1]]) is not None
    assert "(default: 256)" in _help_of("--max-num-seqs")
    assert "(default: 512MiB)" in _help_of("--grammar-cache-memory")
    assert "(default: on)" in _help_of("--enable-prefix-caching")


def test_every_engine_flag_reaches_its_config_field():
    given = _parse(["--scheduling-policy", "priority", "--kv-cache-memory", "1GiB",
                    "--max-num-queued-requests", "7", "--grammar-compile-timeout", "3",
                    "--grammar-cache-memory", "1M", "--no-enable-prefix-caching", "-tp", "1"])
    config = make_engine_config("m", **serve_args.engine_kwargs(given))
    assert config.scheduler_config.policy == "priority"
    assert config.cache_config.kv_cache_memory_bytes == 2**30
    assert config.scheduler_config.max_num_queued_reqs == 7
    assert config.structured_outputs_config.grammar_compile_timeout_s == 3.0
    assert config.structured_outputs_config.grammar_cache_bytes == 2**20
    assert config.cache_config.enable_prefix_caching is False


def test_server_flag_defaults_are_the_settings_defaults():
    defaults = {f.name: f.default for f in msgspec.structs.fields(ServerSettings)}
    kwargs = serve_args.settings_kwargs(_parse([]))
    assert kwargs and all(kwargs[name] == defaults[name] for name in kwargs), kwargs
    assert "(default: 60)" in _help_of("--engine-stall-timeout")
    assert "(default: 32MiB)" in _help_of("--max-request-body-bytes")
    given = serve_args.settings_kwargs(_parse(["--realtime-max-buffer-seconds", "7",
                                               "--responses-store-max-age", "9"]))
    assert given["realtime_max_buffer_s"] == 7.0 and given["responses_store_max_age_s"] == 9.0


def test_device_is_resolved_in_an_explicit_step():
    config = make_engine_config("m")
    assert config.device == "auto"  # validating a config never detects the device
    resolved = config.resolve()
    assert resolved.device in ("cpu", "cuda") and resolved.resolve() is resolved
    assert make_engine_config("m", device="cpu").resolve().device == "cpu"
    assert dataclasses.replace(resolved, device="auto").device == "auto"
    with pytest.raises(ConfigError, match="device must be"):
        make_engine_config("m", device="tpu")


@pytest.mark.parametrize("removed", ["hf_overrides", "served_model_name"])
def test_unread_engine_arguments_are_refused_not_ignored(removed):
    with pytest.raises(ConfigError, match="unknown engine argument"):
        make_engine_config("m", **{removed: "x"})


def test_log_level_takes_what_python_logging_takes(monkeypatch):
    for value in ("warn", "WARN", "fatal", "warning", "debug"):
        monkeypatch.setenv("FORNAX_LOG_LEVEL", value)
        assert env.LOG_LEVEL.get() == value.lower()


def test_a_bad_engine_variable_refuses_to_build_an_engine(monkeypatch, tiny_model):
    """Kernel variables are read inside steps: a bad value must stop the engine at start, not
    fail every step later (FORNAX_NATIVE_KERNELS=2 once did, with the torch_ref backend)."""
    from fornax.runtime import LLM

    monkeypatch.setenv("FORNAX_NATIVE_KERNELS", "2")
    with pytest.raises(ConfigError, match="FORNAX_NATIVE_KERNELS"):
        LLM(str(tiny_model("llama")), dtype="float32", attention_backend="torch_ref")
    monkeypatch.setenv("FORNAX_NATIVE_KERNELS", "1")
    monkeypatch.setenv("FORNAX_CPU_LINEAR", "fastest")
    with pytest.raises(ConfigError, match="FORNAX_CPU_LINEAR"):
        env.check_engine_variables()


def test_llm_takes_the_models_own_tokenizer_and_refuses_a_missing_one(tiny_model):
    """vLLM scripts pass `tokenizer=` the model's own path; another tokenizer must exist (a
    folder, or a hub id in the local cache: tests/unit/test_hub_cache.py)."""
    from fornax.runtime import LLM

    path = str(tiny_model("llama"))
    llm = LLM(path, tokenizer=path, dtype="float32", max_model_len=128)
    assert llm.generate(["hello"])[0].outputs[0].token_ids
    with pytest.raises(ModelLoadError, match="tokenizer path '/elsewhere' does not exist"):
        LLM(path, tokenizer="/elsewhere", dtype="float32")
