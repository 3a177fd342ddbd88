"""vLLM's metrics on a real `fornax serve` after real traffic: every series vLLM's example Grafana
dashboards read is there, each family has vLLM's labels and buckets, and the counters moved by
exactly what the traffic did."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fornax.api.server.metrics_catalog import exported, readme_table
from fornax.runtime.engine import stats
from helpers.api_server import serving, tiny_model_path

MAX_MODEL_LEN = 512
FIXTURE = Path(__file__).parents[1] / "fixtures" / "vllm_grafana_metrics.txt"
BUCKETS = {"TTFT_BUCKETS": stats.TTFT_BUCKETS, "TOKEN_STEP_BUCKETS": stats.TOKEN_STEP_BUCKETS,
           "REQUEST_LATENCY_BUCKETS": stats.REQUEST_LATENCY_BUCKETS,
           "ITERATION_TOKENS_BUCKETS": stats.ITERATION_TOKENS_BUCKETS,
           "PARAMS_N_BUCKETS": stats.PARAMS_N_BUCKETS,
           "SLEEP_OPERATION_BUCKETS": stats.SLEEP_OPERATION_BUCKETS,
           "HTTP_DURATION_BUCKETS": stats.HTTP_DURATION_BUCKETS,
           "1-2-5 to max_model_len": stats.build_1_2_5_buckets(MAX_MODEL_LEN)}


def dashboard_names() -> tuple[list[str], dict[str, str]]:
    """(series fornax must export, excluded series -> why) from the fixture."""
    wanted, excluded = [], {}
    for line in FIXTURE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, status = line.split(" ", 1)
        if status == "-":
            wanted.append(name)
        else:
            assert status.startswith("excluded: "), line
            excluded[name] = status
    return wanted, excluded


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in snap.items() if n == name and want <= lab)


@pytest.fixture(scope="module")
def server():
    with serving(str(tiny_model_path("llama")), "--served-model-name", "tiny",
                 "--max-model-len", str(MAX_MODEL_LEN), "--api-server-count", "1",
                 "--enable-dev-endpoints", "--dtype", "float32") as srv:
        yield srv


@pytest.fixture(scope="module")
def traffic(server):
    """Scrapes before and after: 3 completions cut by max_tokens, one n=2 request, a streamed
    chat, a sleep and a wake-up. Returns (before, after, facts about what was sent)."""
    http = httpx.Client(base_url=server.url, timeout=120)
    before_text = http.get("/metrics").text
    prompt_tokens = completion_tokens = 0
    for i in range(3):
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": f"Counting {i}:",
                                               "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        completion_tokens += r.json()["usage"]["completion_tokens"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Two ways:", "n": 2,
                                           "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    two_prompt = r.json()["usage"]["prompt_tokens"]  # counted once in usage, twice by vLLM
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "ignore_eos": True, "stream": True}) as resp:
        assert resp.status_code == 200
        body = "".join(resp.iter_text())
    assert "[DONE]" in body
    assert http.post("/sleep?level=1").status_code == 200
    assert http.post("/wake_up").status_code == 200
    after_text = http.get("/metrics").text
    facts = {"prompt_tokens": prompt_tokens + 2 * two_prompt, "length3": completion_tokens}
    return samples(before_text), samples(after_text), after_text, facts


def test_every_dashboard_series_is_exported(traffic):
    _, after, _, _ = traffic
    wanted, excluded = dashboard_names()
    names = {n for n, _ in after}
    missing = [n for n in wanted if n not in names]
    assert not missing, f"series vLLM's dashboards read that /metrics lacks: {missing}"
    # what is excluded is only what fornax lacks the feature for, never a family it has
    assert not [n for n in excluded if n in names]
    assert all(n.startswith(("vllm:kv_block_", "vllm:nixl_", "vllm:kv_offload_", "up",
                             "vllm:simple_kv_offload_", "vllm:num_requests_kv_fetch",
                             "vllm:lora_", "vllm:rl_weight", "vllm:estimated_"))
               for n in excluded)


def test_labels_and_buckets_are_vllms(traffic):
    _, _, text, _ = traffic
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for fam in exported():
        name = fam.name.removesuffix("_total") if fam.kind == "counter" else fam.name
        if fam.name.startswith("vllm:websocket"):
            continue  # exported once a realtime session opened (none here)
        assert name in families, fam.name
        got = families[name]
        for s in got.samples:
            if s.name.endswith("_created"):
                continue
            keys = set(s.labels) - {"le"}
            assert keys == set(fam.labels), (s.name, keys, fam.labels)
        if fam.buckets:
            les = sorted({float(s.labels["le"]) for s in got.samples if "le" in s.labels})
            assert les == [*map(float, BUCKETS[fam.buckets]), float("inf")], fam.name


def test_counters_moved_by_the_traffic(traffic):
    before, after, _, facts = traffic

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 3 + 2 + 1
    assert delta("vllm:request_success_total", finished_reason="stop") == 0
    chat_prompt = delta("vllm:request_prompt_tokens_sum") - facts["prompt_tokens"]
    assert chat_prompt > 0  # the chat request's templated prompt
    assert delta("vllm:prompt_tokens_total") == facts["prompt_tokens"] + chat_prompt
    assert delta("vllm:request_prompt_tokens_count") == 6
    assert delta("vllm:generation_tokens_total") == facts["length3"] + 2 * 3 + 4
    assert delta("vllm:request_generation_tokens_sum") == facts["length3"] + 2 * 3 + 4
    computed = delta("vllm:prompt_tokens_by_source_total", source="local_compute")
    hits = delta("vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    assert computed + hits == delta("vllm:prompt_tokens_total")
    assert hits == delta("vllm:prompt_tokens_cached_total")
    assert delta("vllm:request_prefill_kv_computed_tokens_sum") == computed
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"vllm:request_{phase}_time_seconds_count") == 6, phase
    assert delta("vllm:request_params_n_count") == 5
    assert delta("vllm:request_params_n_sum") == 3 + 2 + 1
    assert delta("vllm:request_max_num_generation_tokens_sum") == 5 * 3 + 3 + 4
    assert delta("vllm:request_params_max_tokens_sum") == 5 * 3 + 3 * 2 + 4
    assert delta("vllm:time_to_first_token_seconds_count") == 6
    assert delta("vllm:request_time_per_output_token_seconds_count") == 6
    # the engine counts its steps: at least one per generated token after the first
    assert delta("vllm:iteration_tokens_total_count") >= 4
    assert delta("vllm:iteration_tokens_total_sum") >= delta("vllm:prompt_tokens_total") - hits
    assert delta("http_requests_total", handler="/v1/completions", status="2xx") == 4
    assert delta("http_requests_total", handler="/v1/chat/completions", method="POST") == 1
    assert value(after, "http_requests_total", handler="/metrics") == 0  # excluded, as vLLM
    assert delta("vllm:sleep_mode_operation_duration_seconds_count", operation="sleep") == 1
    assert delta("vllm:sleep_mode_operation_duration_seconds_count", operation="wake") == 1
    assert value(after, "vllm:engine_sleep_state", sleep_state="awake") == 1
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:cache_config_info", block_size="16", engine="0") == 1


def test_readme_table_is_the_catalog():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start, end = "<!-- metrics-table-start -->\n", "\n<!-- metrics-table-end -->"
    assert readme.split(start, 1)[1].split(end, 1)[0] == readme_table()


def test_http_method_labels_stay_a_fixed_set() -> None:
    """Any method token reaches the app; only the standard ones become label values."""
    from fornax.api.server.metrics import Metrics

    metrics = Metrics("m")
    for method in ("GET", "FOOBAR1", "X" * 200):
        metrics.observe_http("/v1/models", method, 404, 0.001)
    methods = {sample.labels["method"]
               for family in metrics.registry.collect() if family.name == "http_requests"
               for sample in family.samples}
    assert methods == {"GET", "other"}
