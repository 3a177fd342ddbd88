"""A many-model server's entries from `--models` and a --config file's `models:` list (no server):
the command line's engine flags under each entry's own, the packaged trio with no MODEL, and a
refusal naming the entry and the key for everything else (fuzzed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fornax.api.cli import build_parser
from fornax.api.server.argv import normalize_serve_argv, subparser
from fornax.api.server.model_entries import model_entries
from fornax.runtime.errors import ConfigError
from fornax.runtime.limits import MAX_KEEP_ALIVE_S, MAX_SERVED_MODELS
from helpers.fuzzing.serve_models import model_words
from helpers.fuzzing.values import any_json


def _entries(*argv: str):
    parser = build_parser()
    serve = subparser(parser, "serve")
    args = parser.parse_args(["serve", *normalize_serve_argv(list(argv), serve)])
    return model_entries(args, serve)


def test_a_config_file_models_list_with_top_level_flags(tmp_path):
    config = tmp_path / "many.yaml"
    config.write_text("dtype: float32\nport: 9000\nmodels:\n"
                      "  - model: /m/chat\n    served_model_name: chat\n    max_model_len: 2048\n"
                      "  - model: /m/embed\n    served_model_name: [embed, e]\n"
                      "    dtype: bfloat16\n    runner: pooling\n"
                      "  - whisper-tiny.en\n")
    chat, embed, speech = _entries("--config", str(config), "--max-num-seqs", "8")
    assert (chat.model, chat.served, chat.kwargs) == (
        "/m/chat", ["chat"], {"dtype": "float32", "max_num_seqs": 8, "max_model_len": 2048})
    assert embed.served == ["embed", "e"] and embed.kwargs["dtype"] == "bfloat16"
    assert embed.kwargs["runner"] == "pooling"
    assert speech.served == ["whisper-tiny.en"] and speech.kwargs["dtype"] == "float32"


def test_one_model_command_lines_are_not_entries():
    assert _entries("/m/chat", "--max-model-len", "128") is None
    assert _entries("--model", "/m/chat") is None


def test_no_model_is_the_packaged_trio_with_the_flags_on_the_chat_model():
    chat, embed, speech = _entries("--max-model-len", "2048")
    assert chat.served == ["SmolLM2-135M-Instruct"] and chat.kwargs == {"max_model_len": 2048}
    assert (embed.served, embed.kwargs) == (["all-MiniLM-L6-v2"], {})
    assert (speech.served, speech.kwargs) == (["whisper-tiny.en"], {})
    assert "openai/whisper-tiny.en" in speech.aliases


@pytest.mark.parametrize(("argv", "named"), [
    (["--models", '{"model": "/a", "port": 1}'], "models[0].port: a server flag"),
    (["--models", "/a", '{"model": "/b", "nope": 1}'], "models[1].nope: unknown flag"),
    (["--models", '{"dtype": "float32"}'], "models[0]: `model`"),
    (["--models", '{"model": "/a", "max_model_len": "lots"}'], "models[0] (/a)"),
    (["--models", "/a", '{"model": "/b", "served_model_name": "/a"}'], "models[1]: the name"),
    (["--models", '{"model": "/a"'], "models[0]: not a JSON object"),
    (["/a", "--models", "/b"], "either MODEL or --models"),
    (["--models", *[f"/m{i}" for i in range(MAX_SERVED_MODELS + 1)]],
     f"at most {MAX_SERVED_MODELS} models"),
])
def test_bad_entries_are_refused_naming_the_entry(argv, named):
    with pytest.raises(ConfigError) as info:
        _entries(*argv)
    assert named in str(info.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=model_words())
def test_fuzzed_entries_are_entries_or_a_config_error(words):
    try:
        entries = _entries("--models", *words)
    except ConfigError:
        return
    except SystemExit:  # argparse refused a word of --models itself (e.g. one like a flag)
        return
    assert entries and all(e.model and e.served for e in entries)
    assert len({n for e in entries for n in e.served}) == sum(len(e.served) for e in entries)
    json.dumps([e.kwargs for e in entries], default=str)


def test_keep_alive_is_seconds_or_a_duration():
    from fornax.api.server.errors import APIError
    from fornax.api.server.model_set import keep_alive_seconds

    assert [keep_alive_seconds(v) for v in (None, 0, 30, "30s", "5m", "1h", "250ms", -1, "-1")] \
        == [None, 0.0, 30.0, 30.0, 300.0, 3600.0, 0.25, -1.0, -1.0]
    with pytest.raises(APIError) as huge:  # float() of this int would raise OverflowError
        keep_alive_seconds(10**400)
    assert huge.value.status == 400 and huge.value.param == "keep_alive"


@settings(max_examples=300, deadline=None)
@given(value=any_json())
def test_fuzzed_keep_alive_is_seconds_or_a_400_naming_it(value):
    from fornax.api.server.errors import APIError
    from fornax.api.server.model_set import keep_alive_seconds

    try:
        seconds = keep_alive_seconds(value)
    except APIError as exc:
        assert exc.status == 400 and exc.param == "keep_alive"
        return
    assert seconds is None or seconds == -1.0 or 0 <= seconds <= MAX_KEEP_ALIVE_S


def test_a_route_loads_its_model_only_when_the_model_serves_it():
    """`serves` decides whether a request loads (and holds) its model: every route a model's
    handler runs in its engine must answer True, or the request reaches an unloaded engine, or
    one evicted meanwhile. /invocations with `messages` on a pooling model is its embeddings
    (or classification): the model serves it."""
    from types import SimpleNamespace

    from fornax.api.server.model_set import serves

    def model(runner):
        return SimpleNamespace(engine_info=SimpleNamespace(runner=runner))

    pooling, chat, speech = model("pooling"), model("generate"), model("transcription")
    assert serves(pooling, "/invocations", generate=True)  # messages: embeddings
    assert serves(pooling, "/invocations") and serves(chat, "/invocations", generate=True)
    assert not serves(speech, "/invocations", generate=True)
    assert not serves(chat, "/invocations")  # input/query/text_1 on a chat model: 501
    assert serves(pooling, "/v1/embeddings") and not serves(chat, "/v1/embeddings")
    assert serves(speech, "/v1/audio/transcriptions") and not serves(chat, "/v1/audio/translations")
    assert serves(chat, "/v1/chat/completions") and not serves(pooling, "/v1/completions")


_FORM = "multipart/form-data; boundary=xx"


def _form(*parts: tuple[str, bytes]) -> bytes:
    out = b"".join(b'--xx\r\nContent-Disposition: form-data; name="' + name.encode()
                   + b'"\r\n\r\n' + value + b"\r\n" for name, value in parts)
    return out + b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.wav"' \
        b"\r\n\r\nRIFF\r\n--xx--\r\n"


def test_router_fields_of_json_bodies_and_audio_forms():
    """The one reader of a body's `model` (fornax serve's many-model router and the Ray ingress):
    JSON field or audio form part, the last part wins, undecodable names none."""
    from fornax.api.server.model_set import RouterFields, router_fields

    assert router_fields("/v1/chat/completions", b'{"model": "a", "messages": [],'
                         b' "keep_alive": "5m"}', None) == RouterFields("a", "5m")
    assert router_fields("/v1/embeddings", b'{"model": 3}', None) == RouterFields()
    assert router_fields("/v1/completions", b"not json", None) == RouterFields()
    assert router_fields("/v1/completions", b"[" * 100_000, None) == RouterFields()
    assert router_fields("/v1/responses/abc", b'{"model": "a"}', None) == RouterFields()
    assert router_fields("/invocations", b'{"prompt": "x"}', None) == \
        RouterFields(generate=True)
    assert router_fields("/invocations", b'{"input": "x", "model": "e"}', None) == \
        RouterFields("e")
    audio = "/v1/audio/transcriptions"
    assert router_fields(audio, _form(("model", b"whisper")), _FORM) == RouterFields("whisper")
    assert router_fields(audio, _form(("model", b"a"), ("keep_alive", b"0"), ("model", b" b ")),
                         _FORM) == RouterFields("b", "0")
    assert router_fields(audio, _form(("model", b"\xff"), ("keep_alive", b"\xfe")), _FORM) == \
        RouterFields(None, "(not UTF-8)")
    assert router_fields(audio, b"garbage", "multipart/form-data") == RouterFields()
    assert router_fields(audio, _form(("model", b"a")), None) == RouterFields()


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(["/v1/chat/completions", "/invocations", "/v1/audio/translations",
                             "/v1/embeddings", "/v1/responses"]),
       body=st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), any_json()),
       content_type=st.sampled_from([None, _FORM, "multipart/form-data", "application/json"]))
def test_fuzzed_bodies_give_router_fields_never_an_error(path, body, content_type):
    from fornax.api.server.model_set import router_fields

    fields = router_fields(path, body, content_type)
    assert fields.model is None or isinstance(fields.model, str)
