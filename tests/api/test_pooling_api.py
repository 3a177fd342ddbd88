"""Pooling routes against real `fornax serve` processes: MiniLM, a tiny embedder, cross-encoder and
classifier. Embeddings (openai client, float and base64), Cohere/Jina shapes, 400s and 501s."""

from __future__ import annotations

import asyncio
import base64
import signal

import httpx
import numpy as np
import openai
import pytest

from fornax.runtime import LLM
from helpers.api_server import ServerProcess
from helpers.pooling_fixtures import DOCS, QUERY, minilm_path
from tools.make_tiny_bert import tiny_bert_dir

pytestmark = pytest.mark.slow  # the packaged MiniLM and three servers
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def servers(cross_server: ServerProcess):
    """Four servers: the session's cross-encoder (tests/api/conftest.py, shared with the SageMaker
    tests) and three started side by side (each loads its model while the others do)."""
    minilm_path()  # skips when the packaged MiniLM is not installed
    specs = {  # MiniLM by its hub name: resolved to the installed package, offline
        "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "--served-model-name", "minilm"),
        "embed": (str(tiny_bert_dir("bert-embed")), "--served-model-name", "tiny-embed",
                  "--chat-template", TEMPLATE),
        "cls": (str(tiny_bert_dir("bert-classify")), "--served-model-name", "tiny-cls"),
    }
    # float32: the scores are compared with float32 references to 1e-5 (CROSS_ARGS too)
    started = {name: ServerProcess(*args, "--dtype", "float32") for name, args in specs.items()}
    try:
        for server in started.values():
            server.wait_ready(180)
        yield {**started, "cross": cross_server}
    finally:
        for server in started.values():  # SIGTERM all first: they drain side by side
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in started.values():
            server.stop(timeout_s=10)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def ok(server: ServerProcess, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def minilm_offline() -> LLM:
    return LLM(str(minilm_path()), dtype="float32")  # as the servers


def test_openai_client_float_and_base64(servers, minilm_offline) -> None:
    client = openai.OpenAI(base_url=servers["minilm"].url + "/v1", api_key="none", max_retries=0)
    texts = ["The cat sat on the mat.", "Embeddings map text to vectors", "短い文"]
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model="minilm", input=texts, encoding_format="base64")
    raw = post(servers["minilm"], "/v1/embeddings",
               {"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    expected = [o.outputs.embedding for o in minilm_offline.embed(texts)]
    default = client.embeddings.create(model="minilm", input=texts)  # base64 on the wire
    # separate requests may land in differently shaped batches: float32 rounding apart
    for i, item in enumerate(as_float.data):
        assert item.index == i and item.object == "embedding" and len(item.embedding) == 384
        assert np.allclose(item.embedding, expected[i], atol=1e-5)
        assert np.allclose(default.data[i].embedding, item.embedding, atol=1e-6)
        for b64 in (as_b64.data[i].embedding, raw["data"][i]["embedding"]):
            decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
            assert np.allclose(decoded, item.embedding, atol=1e-6)
    tokens = sum(len(o.prompt_token_ids) for o in minilm_offline.embed(texts))
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens
    assert as_float.model == "minilm" and as_float.object == "list"
    single = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert np.allclose(single.data[0].embedding, expected[0], atol=1e-5)


def test_token_id_inputs_truncation_and_pooling_route(servers, minilm_offline) -> None:
    server = servers["minilm"]
    ids = minilm_offline.tokenizer.encode("hello world")
    one = ok(server, "/v1/embeddings", {"input": ids})["data"]
    many = ok(server, "/v1/embeddings", {"input": [ids, ids[:2] + ids[-1:]]})["data"]
    text = ok(server, "/v1/embeddings", {"input": "hello world"})["data"]
    assert np.allclose(one[0]["embedding"], text[0]["embedding"], atol=1e-6)
    assert np.allclose(many[0]["embedding"], text[0]["embedding"], atol=1e-6)
    cut = ok(server, "/v1/embeddings", {"input": "word " * 400, "truncate_prompt_tokens": 12})
    assert cut["usage"]["prompt_tokens"] == 12
    pooled = ok(server, "/pooling", {"input": ["hello world"]})
    assert pooled["object"] == "list" and pooled["data"][0]["object"] == "pooling"
    assert np.allclose(pooled["data"][0]["data"], text[0]["embedding"], atol=1e-6)


def test_cohere_v2_embed_shape_field_by_field(servers) -> None:
    body = {"model": "minilm", "texts": ["hello world", "good bye"], "input_type":
            "search_document", "embedding_types": ["float", "int8", "uint8", "binary",
                                                   "ubinary", "base64"]}
    out = ok(servers["minilm"], "/v2/embed", body)
    assert set(out) == {"id", "embeddings", "texts", "meta", "response_type"}
    assert out["response_type"] == "embeddings_by_type" and out["texts"] == body["texts"]
    assert out["meta"]["api_version"] == {"version": "2"}
    assert out["meta"]["billed_units"]["input_tokens"] == 8  # [CLS] hello world [SEP] x 2
    emb = out["embeddings"]
    vec = np.array(emb["float"][0])
    assert len(emb["float"]) == 2 and vec.shape == (384,)
    assert emb["int8"][0] == [max(-128, min(127, round(v * 127))) for v in vec]
    assert emb["uint8"][0] == [v + 128 for v in emb["int8"][0]]
    assert emb["ubinary"][0] == list(np.packbits(vec > 0))
    assert emb["binary"][0] == [b - 128 for b in emb["ubinary"][0]]
    assert np.allclose(np.frombuffer(base64.b64decode(emb["base64"][0]), "<f4"), vec, atol=1e-7)


def test_score_and_rerank_by_embedding_similarity(servers, minilm_offline) -> None:
    server = servers["minilm"]
    embs = np.array([o.outputs.embedding for o in minilm_offline.embed([QUERY, *DOCS])])
    cosines = embs[1:] @ embs[0]
    score = ok(server, "/score", {"text_1": QUERY, "text_2": DOCS})
    assert [d["index"] for d in score["data"]] == list(range(len(DOCS)))
    assert np.allclose([d["score"] for d in score["data"]], cosines, atol=1e-5)
    v1 = ok(server, "/v1/score", {"queries": QUERY, "documents": DOCS})
    assert np.allclose([d["score"] for d in v1["data"]], cosines, atol=1e-5)
    rr = ok(server, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2})
    assert [r["index"] for r in rr["results"]] == list(np.argsort(-cosines)[:2])
    assert rr["results"][0]["document"] == {"text": DOCS[rr["results"][0]["index"]]}


def test_dimensions_and_chat_messages(servers) -> None:
    server = servers["embed"]
    raw = np.array(ok(server, "/v1/embeddings", {"input": DOCS[0], "normalize": False})
                   ["data"][0]["embedding"])
    small = ok(server, "/v1/embeddings", {"input": DOCS[0], "dimensions": 8})["data"][0]
    assert np.allclose(small["embedding"], raw[:8] / np.linalg.norm(raw[:8]), atol=1e-6)
    bad = post(server, "/v1/embeddings", {"input": DOCS[0], "dimensions": 12})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
    messages = [{"role": "user", "content": "hello there"}]
    chat = ok(server, "/v1/embeddings", {"messages": messages})
    ids = ok(server, "/tokenize", {"prompt": "user: hello there\n", "add_special_tokens": False})
    plain = ok(server, "/v1/embeddings", {"input": ids["tokens"]})
    assert np.allclose(chat["data"][0]["embedding"], plain["data"][0]["embedding"], atol=1e-6)


def test_cross_encoder_rerank_jina_and_cohere_shapes(servers) -> None:
    server = servers["cross"]
    scores = [d["score"] for d in ok(server, "/score", {"text_1": QUERY, "text_2": DOCS})["data"]]
    order = list(np.argsort(-np.array(scores)))
    jina = ok(server, "/v1/rerank", {"model": "tiny-cross", "query": QUERY, "documents": DOCS})
    assert set(jina) == {"id", "model", "usage", "results"}
    assert jina["model"] == "tiny-cross" and jina["usage"]["total_tokens"] > 0
    assert [r["index"] for r in jina["results"]] == order
    for r in jina["results"]:
        assert set(r) == {"index", "relevance_score", "document"}
        assert r["document"] == {"text": DOCS[r["index"]]}
        assert np.isclose(r["relevance_score"], scores[r["index"]], atol=1e-6)
    top = ok(server, "/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS],
                                 "top_n": 2, "return_documents": False})
    assert [r["index"] for r in top["results"]] == order[:2]
    assert all("document" not in r for r in top["results"])
    cohere = ok(server, "/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3})
    assert [r["index"] for r in cohere["results"]] == order[:3]
    assert cohere["meta"] == {"api_version": {"version": "2"},
                              "billed_units": {"search_units": 1}}
    offline = LLM(str(tiny_bert_dir("bert-cross")), dtype="float32")
    assert np.allclose(scores, [o.outputs.score for o in offline.score(QUERY, DOCS)], atol=1e-5)
    probs = ok(server, "/classify", {"input": DOCS[0]})["data"][0]
    assert probs["num_classes"] == 1 and 0.0 < probs["probs"][0] < 1.0  # a sigmoid
    assert post(server, "/v1/embeddings", {"input": "x"}).status_code == 501


def test_classifier_labels_and_probs(servers) -> None:
    server = servers["cls"]
    out = ok(server, "/classify", {"model": "tiny-cls", "input": DOCS})
    offline = LLM(str(tiny_bert_dir("bert-classify")), dtype="float32").classify(DOCS)
    assert out["object"] == "list" and len(out["data"]) == len(DOCS)
    for item, ref in zip(out["data"], offline):
        assert item["num_classes"] == 3 and np.allclose(item["probs"], ref.outputs.probs, atol=1e-6)
        assert item["label"] == ["negative", "neutral", "positive"][int(np.argmax(item["probs"]))]
    refused = post(server, "/rerank", {"query": QUERY, "documents": DOCS})
    assert refused.status_code == 501 and "3 labels" in refused.json()["error"]["message"]


def test_generation_routes_and_wrong_tasks_are_501(servers) -> None:
    server = servers["minilm"]
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"}), ("/classify", {"input": "x"})):
        r = post(server, path, body)
        assert r.status_code == 501, (path, r.text)
        assert r.json()["error"]["type"] == "NotImplementedError"
    assert httpx.get(server.url + "/health?deep=1", timeout=30).status_code == 200


def test_pooling_routes_on_a_generation_model_are_501() -> None:
    from types import SimpleNamespace

    from fornax.api.routes.pooling_common import require_task
    from fornax.api.server.errors import APIError
    from fornax.runtime.engine.messages import EngineHandshake

    info = EngineHandshake(ready=True, architecture="LlamaForCausalLM")  # runner "generate"
    state = SimpleNamespace(engine_info=info)
    with pytest.raises(APIError) as err:
        require_task(state, "embed", "/v1/embeddings")  # type: ignore[arg-type]
    assert err.value.status == 501 and "--runner pooling" in err.value.message


BAD = [
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": [1, "a"]}, "input"),
    ("/v1/embeddings", {"input": [[]]}, "input"),
    ("/v1/embeddings", {"input": {"text": "x"}}, "input"),
    ("/v1/embeddings", {}, "input"),
    ("/v1/embeddings", {"input": [[101, 10 ** 9]]}, "input"),
    ("/v1/embeddings", {"input": "word " * 400}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": "8"}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 9999}, "truncate_prompt_tokens"),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, "model"),
    ("/score", {"text_1": "x"}, "text_2"),
    ("/score", {"text_1": ["a", "b", "c"], "text_2": ["a", "b"]}, "text_2"),
    ("/score", {"text_1": [], "text_2": "x"}, "text_1"),
    ("/rerank", {"query": "", "documents": ["x"]}, "query"),
    ("/rerank", {"query": "x", "documents": []}, "documents"),
    ("/rerank", {"query": "x", "documents": [3]}, "documents"),
    ("/rerank", {"query": "x", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/v2/embed", {"texts": []}, "texts"),
    ("/v2/embed", {"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types"),
    ("/v2/embed", {"texts": ["word " * 400], "truncate": "NONE"}, "texts"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[f"{p}-{b}"[:60] for p, b, _ in BAD])
def test_bad_inputs_are_400_naming_the_field(servers, path, body, param) -> None:
    r = post(servers["minilm"], path, body)
    expected = 404 if param == "model" else 400
    assert r.status_code == expected, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]


def test_many_concurrent_small_requests_each_get_their_own_result(servers) -> None:
    server = servers["embed"]
    texts = [f"request number {i}: " + " ".join(DOCS[i % len(DOCS)].split()[: 1 + i % 6])
             for i in range(48)]
    offline = LLM(str(tiny_bert_dir("bert-embed")), dtype="float32")
    expected = [o.outputs.embedding for o in offline.embed(texts)]

    async def one(client: httpx.AsyncClient, text: str) -> list[float]:
        r = await client.post("/v1/embeddings", json={"input": text})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    async def run_all() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, t) for t in texts))

    got = asyncio.run(run_all())
    for text, vec, ref in zip(texts, got, expected):
        assert np.allclose(vec, ref, atol=1e-5), text
