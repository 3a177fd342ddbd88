"""Every `vllm serve` flag has a status in `fornax serve`; vLLM's parser conventions (no server)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from fornax.api.cli import build_parser, main
from fornax.api.server import vllm_flags
from fornax.api.server.args import engine_kwargs, settings_kwargs, vllm_config_notes
from fornax.api.server.argv import ArgvError, normalize_serve_argv, subparser
from fornax.api.server.serve import run_serve
from fornax.api.server.vllm_flags import VllmFlag, check_vllm_flags
from fornax.api.server.vllm_flags import vllm_flags as all_flags
from fornax.runtime.config import make_engine_config
from fornax.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    return build_parser()  # one for the module: building 330 flags takes a while


def _serve_parser() -> argparse.ArgumentParser:
    return subparser(_parser(), "serve")


def parse(*argv: str) -> argparse.Namespace:
    """`fornax serve ARGV` as main() parses it (conventions first, then argparse)."""
    words = normalize_serve_argv(list(argv), _serve_parser())
    return _parser().parse_args(["serve", *words])


def _sample(flag: VllmFlag, rng: random.Random | None = None) -> list[str]:
    """Command-line words giving `flag` a value other than vLLM's default."""
    if flag.kind == "bool":
        if flag.default is True and flag.negative_spellings:
            return [flag.negative_spellings[0]]
        return [flag.name]
    if flag.choices:
        other = [str(c) for c in flag.choices if c != flag.default]
        return [flag.name, (rng or random).choice(other) if rng else other[0]]
    value = {"int": "7", "float": "0.5", "size": "4k", "json": '{"x": 1}',
             "json-or-str": '{"x": 1}', "str": "something"}[flag.kind]
    if flag.nargs == "+":
        return [flag.name, value, value]
    return [flag.name, value]


def _default_words(flag: VllmFlag) -> list[str]:
    """Command-line words giving `flag` vLLM's default value (a no-op's first accepted one)."""
    if flag.kind == "bool":
        if flag.accept == ("off",) or not flag.default:
            return [flag.negative_spellings[0]] if flag.negative_spellings else []
        return [flag.name]
    value = flag.default
    if value is None or not vllm_flags.accepts(flag, value):
        value = flag.accept[0] if flag.accept else None
    if value is None:
        return _sample(flag)
    if isinstance(value, (list, dict)):
        text = json.dumps(value) if flag.kind in ("json", "json-or-str") else None
        if text is None:
            return [flag.name, *map(str, value)] if value else []
        return [flag.name, text]
    return [flag.name, str(value)]


def test_every_vllm_flag_has_exactly_one_status():
    names = {row["name"] for row in vllm_flags.vllm_source()["flags"]}
    table = vllm_flags.parse_status_table()
    assert not names - set(table), f"give these vLLM flags a status: {sorted(names - set(table))}"
    assert not set(table) - names, f"not vLLM flags: {sorted(set(table) - names)}"
    assert len(names) == len(all_flags()) > 300
    assert all(f.note and f.status in vllm_flags.STATUSES for f in all_flags())


def test_fornax_parses_the_implemented_flags_and_every_spelling_of_every_flag():
    options = _serve_parser()._option_string_actions
    for flag in all_flags():
        missing = [s for s in flag.spellings if s not in options]
        assert not missing, (flag.name, missing)
        dest = options[flag.name].dest
        if flag.status in ("implemented", "mapped"):
            assert dest != flag.dest, f"{flag.name} is {flag.status} but fornax has no flag for it"
        else:  # a fornax flag of that name would make the status stale
            assert dest == flag.dest, f"{flag.name} is parsed by fornax now: update its status"


def test_no_op_flags_parse_with_their_default_value_and_log_one_line():
    for flag in (f for f in all_flags() if f.status == "no-op"):
        words = _default_words(flag)
        args = parse(*words)
        problems, notes = check_vllm_flags(args)
        assert not problems, (flag.name, words, problems)
        if getattr(args, flag.dest) is not None:  # given ('' and None are vLLM's "not given")
            assert len(notes) == 1 and notes[0].startswith(flag.name), (flag.name, notes)


def test_refused_flags_exit_2_naming_the_flag():
    for flag in (f for f in all_flags() if f.status == "refused"):
        args = parse("/no/such/model", *_sample(flag))
        problems, _ = check_vllm_flags(args)
        assert len(problems) == 1 and problems[0].startswith(flag.name), (flag.name, problems)
        assert run_serve(args) == 2, flag.name
    # given vLLM's default value, a refused flag asks for nothing
    assert check_vllm_flags(parse("--disable-lora", "--grpc-port", "None"))[0] == []


def test_value_dependent_no_ops():
    ok = parse("-pp", "1", "-dp", "1", "--kv-cache-dtype", "AUTO", "--async-scheduling",
               "--disable-log-stats", "--nnodes", "1", "--no-async-scheduling",
               "--allowed-methods", '["*"]', "--cpu-offload-gb", "0")
    problems, notes = check_vllm_flags(ok)
    assert not problems and len(notes) == 8, (problems, notes)
    for words, named in ((["-pp", "2"], "--pipeline-parallel-size 2"),
                         (["-dp", "4"], "--data-parallel-size 4"),
                         (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
                         (["-dph"], "--data-parallel-hybrid-lb true"),
                         (["--response-role", "user"], "--response-role user")):
        problems, _ = check_vllm_flags(parse(*words))
        assert len(problems) == 1 and problems[0].startswith(named), problems


def test_underscores_optimization_levels_and_negations():
    args = parse("--max_model_len", "4096", "--max_num_seqs=8", "--disable_log_stats",
                 "--no-enable-prefix-caching", "--disable-chunked-prefill", "-O0")
    kwargs = engine_kwargs(args)
    assert kwargs["max_model_len"] == 4096 and kwargs["max_num_seqs"] == 8
    assert kwargs["enable_prefix_caching"] is False and kwargs["enable_chunked_prefill"] is False
    assert kwargs["enforce_eager"] is True and args.vllm_disable_log_stats is True
    for words in (["-O3"], ["-O", "3"], ["-O=3"], ["--optimization_level", "3"]):
        args = parse(*words)
        assert args.optimization_level == "3" and "enforce_eager" not in engine_kwargs(args)
    assert engine_kwargs(parse("-O0", "--no-enforce-eager"))["enforce_eager"] is False
    assert parse("--disable-prefix-caching").enable_prefix_caching is False
    assert parse("--enable-prefix-caching").enable_prefix_caching is True
    assert parse("--disable-log-requests").disable_log_requests is True
    assert parse("-asc", "3").api_server_count == 3


def test_enum_values_in_any_case():
    args = parse("--attention-backend", "FLASHINFER", "--scheduling-policy", "PRIORITY",
                 "--load-format", "Dummy", "--log-level", "INFO", "--dtype", "BFloat16",
                 "--chat-template-content-format", "OpenAI", "--runner", "Generate")
    kwargs = engine_kwargs(args)
    assert (kwargs["attention_backend"], kwargs["policy"], kwargs["load_format"]) == \
        ("flashinfer", "priority", "dummy")
    assert kwargs["dtype"] == "bfloat16" and kwargs["runner"] == "generate"
    assert args.log_level == "info" and args.chat_template_content_format == "openai"
    assert engine_kwargs(parse("--attention-backend", "cpu_attn"))["attention_backend"] == \
        "cpu_paged"
    assert check_vllm_flags(parse("--tokenizer-mode", "HF", "--model-impl", "VLLM")) == ([], [
        "--tokenizer-mode HF: accepted, no effect in fornax: tokenizers come from tokenizer.json "
        "(Hugging Face tokenizers)", "--model-impl VLLM: accepted, no effect in fornax: models "
        "are fornax's own classes; the transformers backend is not available"])


def test_compilation_and_attention_config_json_and_dotted_keys():
    for words in (["-cc", '{"mode": 0, "cudagraph_capture_sizes": [1, 2, 4]}'],
                  ["--compilation-config.mode", "0", "-cc.cudagraph_capture_sizes+", "1,2",
                   "-cc.cudagraph_capture_sizes+=4"],
                  ["--compilation_config.mode=0", "--compilation-config.cudagraph_capture_sizes",
                   "[1, 2, 4]"]):
        kwargs = engine_kwargs(parse(*words))
        assert kwargs["enforce_eager"] is True and kwargs["cuda_graph_sizes"] == [1, 2, 4], words
    args = parse("-cc.cudagraph_mode", "NONE", "-cc.max_cudagraph_capture_size", "64",
                 "-cc.pass_config.fuse_norm_quant", "true", "-ac.backend", "FLASHINFER",
                 "-ac.flash_attn_version", "3")
    kwargs = engine_kwargs(args)
    assert kwargs["use_cuda_graphs"] is False and kwargs["max_capture_size"] == 64
    assert kwargs["attention_backend"] == "flashinfer"
    notes = vllm_config_notes(args)
    assert [n.split(":")[0] for n in notes] == [
        '--compilation-config pass_config={"fuse_norm_quant"', "--attention-config "
        "flash_attn_version=3"]
    config = make_engine_config("m", **kwargs)
    assert config.compilation_config.max_capture_size == 64
    # the explicit flag wins over -cc; new and old names of the capture sizes
    assert engine_kwargs(parse("-cc.cudagraph_capture_sizes+", "8", "--cudagraph-capture-sizes",
                               "1", "2"))["cuda_graph_sizes"] == [1, 2]
    assert engine_kwargs(parse("--cuda-graph-sizes", "1,2", "--cuda-graph-sizes", "4")
                         )["cuda_graph_sizes"] == [1, 2, 4]
    with pytest.raises(ConfigError, match="--attention-config backend"):
        engine_kwargs(parse("-ac.backend", "FLASH_ATTN"))
    with pytest.raises(ConfigError, match="--compilation-config must be a JSON object"):
        engine_kwargs(parse("-cc", "[1]"))


def test_config_file_precedence_and_model(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("model: /models/from-file\nmax_model_len: 2048\nport: 9000\n"
                    "enable-prefix-caching: false\nserved-model-name: [a, b]\n"
                    "compilation-config:\n  mode: 0\ndisable_log_stats: true\n"
                    "pipeline-parallel-size: 1\nkv_cache_dtype: auto\n")
    args = parse("--config", str(path), "--port", "1234", "--max-model-len", "4k")
    assert (args.model, args.model_flag, args.port) == (None, "/models/from-file", 1234)
    kwargs = engine_kwargs(args)
    assert kwargs["max_model_len"] == 4000 and kwargs["enable_prefix_caching"] is False
    assert kwargs["enforce_eager"] is True and args.served_model_name == ["a", "b"]
    problems, notes = check_vllm_flags(args)
    assert not problems and len(notes) == 3
    # a positional MODEL stays first and wins; the command line's list replaces the file's
    args = parse("/models/cli", "--config", str(path), "--served-model-name", "c",
                 "--enable-prefix-caching")
    assert args.model == "/models/cli" and args.served_model_name == ["c"]
    assert engine_kwargs(args)["enable_prefix_caching"] is True


@pytest.mark.parametrize(("text", "message"), [
    ("max-model-len: 1\nno-such-flag: 3\n", "unknown key 'no-such-flag'"),
    ("port: [1, 2\n", "not valid YAML"),
    ("- port\n", "a mapping of flag names"),
    ("config: other.yaml\n", "unknown key 'config'"),
])
def test_bad_config_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ArgvError, match=message):
        parse("--config", str(path))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(path)])
    assert exit_.value.code == 2 and message.split("'")[0] in stderr.getvalue()
    with pytest.raises(ArgvError, match="cannot read it"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_bad_values_exit_2_naming_the_flag():
    for words, named in ((["--max-model-len", "lots"], "--max-model-len"),
                         (["-O7"], "--optimization-level"),
                         (["--attention-backend", "FLASH_ATTN"], "--attention-backend"),
                         (["--kv-cache-dtype"], "--kv-cache-dtype"),
                         (["--default-chat-template-kwargs", "[1]"],
                          "--default-chat-template-kwargs"),
                         (["-pp", "two"], "--pipeline-parallel-size")):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
            parse(*words)
        assert exit_.value.code == 2 and named in stderr.getvalue(), (words, stderr.getvalue())


def test_default_chat_template_kwargs_reach_the_settings():
    kwargs = settings_kwargs(parse("--default-chat-template-kwargs", '{"enable_thinking": false}'))
    assert kwargs["default_chat_template_kwargs"] == {"enable_thinking": False}


def test_help_groups_flags_as_vllm_does():
    text = _serve_parser().format_help()
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and
              not line.startswith(" ")]
    vllm_titles = [t for t in vllm_flags.vllm_source()["groups"] if t != "options"]
    assert [t for t in titles if t in vllm_titles] == vllm_titles
    model_config = text.split("\nModelConfig:\n")[1].split("\n\n")[0]
    assert "--max-model-len" in model_config and "--dtype" in model_config
    parallel = text.split("\nParallelConfig:\n")[1].split("\n\n")[0]
    assert "--pipeline-parallel-size" in parallel and "[no-op]" in parallel


def test_help_search_by_group_or_word():
    for query, inside, outside in (("ModelConfig", "--max-model-len", "--port"),
                                   ("parallelconfig", "--pipeline-parallel-size", "--dtype"),
                                   ("prefix_caching", "--enable-prefix-caching", "--seed")):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(["serve", f"--help={query}"]) == 0
        assert inside in stdout.getvalue(), query
        assert outside not in stdout.getvalue(), query


def test_readme_table_is_current():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- vllm-flags:start -->\n")[1].split("<!-- vllm-flags:end -->")[0]
    assert block == vllm_flags.markdown_table(), \
        "regenerate with `python -m fornax.api.server.vllm_flags`"


def _random_words(rng: random.Random, flags: tuple[VllmFlag, ...]) -> list[str]:
    words: list[str] = []
    for flag in rng.sample(flags, rng.randint(1, 6)):
        name = rng.choice(flag.spellings)
        if rng.random() < 0.3:
            name = name.replace("-", "_").replace("__", "--", 1)
        if flag.kind == "bool" or name in flag.negative_spellings:
            words.append(name)
            continue
        value: Any = rng.choice([
            "1", "0", "-1", "2", "auto", "AUTO", "x", "", "4k", "1e9", "[1, 2]", '{"a": 1}', "{",
            "None", "null", str(flag.default), *(str(c) for c in flag.choices)])
        words += [name, value] if rng.random() < 0.8 else [f"{name}={value}"]
    if rng.random() < 0.2:
        words.append(rng.choice(["-O3", "-O", "-O9", "-cc.mode", "-cc.mode=0", "--config"]))
    return words


def test_fuzz_random_vllm_launch_lines_exit_0_or_2_never_crash():
    """Random mixes of vLLM's flags and values: parsed and checked, or refused with exit 2 (a
    SystemExit from argparse, an ArgvError, a ConfigError or a start-up problem), nothing else."""
    rng = random.Random(21)
    flags = all_flags()
    outcomes = {"ok": 0, "exit2": 0}
    for _ in range(1500):
        words = _random_words(rng, flags)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = parse(*words)
            problems, _ = check_vllm_flags(args)
            vllm_config_notes(args)
            make_engine_config("m", **engine_kwargs(args))
        except SystemExit as exc:
            assert exc.code == 2, words
            outcomes["exit2"] += 1
            continue
        except (ArgvError, ConfigError):
            outcomes["exit2"] += 1
            continue
        outcomes["exit2" if problems else "ok"] += 1
    assert outcomes["ok"] > 100 and outcomes["exit2"] > 100, outcomes


def test_odd_config_inputs_are_refused_or_read_never_a_traceback(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("served-model-name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ArgvError, match="not UTF-8"):
        parse("--config", str(binary))
    with pytest.raises(ArgvError, match="is not a list"):
        parse("-cc.mode=1", "-cc.mode+", "2")
    dated = tmp_path / "dated.yaml"  # YAML reads an unquoted date as a date object
    dated.write_text("models:\n  - model: /models/a\n    revision: 2024-01-01\n")
    assert "2024-01-01" in json.dumps(vars(parse("--config", str(dated))), default=str)
