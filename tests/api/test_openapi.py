"""GET /openapi.json and /docs on a real `fornax serve` (two API keys): the document is valid
OpenAPI 3.1, lists every route of the app with its methods, its examples fit its own schemas and
are accepted by the server, it holds no secret; /docs is an offline HTML page that headless
Chromium renders into the list of operations with no network but this server."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from fornax.api.server.app import ROUTES
from fornax.api.server.openapi import OPERATIONS, build_document
from helpers.api_server import API_KEYS, auth, tiny_model_path


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def document(server) -> dict:
    r = httpx.get(server.url + "/openapi.json", timeout=30)  # public: no key
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def _documented(doc: dict, route_path: str, method: str) -> bool:
    if "{rest}" in route_path:  # /v1/responses/{rest} is documented as its real sub-paths
        prefix = route_path.split("{")[0]
        return any(p.startswith(prefix) and method.lower() in item
                   for p, item in doc["paths"].items())
    return method.lower() in doc["paths"].get(route_path, {})


def test_the_document_is_valid_openapi_and_lists_every_route(document):
    validate(document)  # OpenAPI 3.1 (its schemas are JSON Schema 2020-12)
    assert document["openapi"].startswith("3.1")
    served = [r for r in ROUTES if not r.dev and not r.switch]  # main_server: no dev endpoints,
    # no tokenizer info: those are listed only where they exist
    missing = [(m, r.path) for r in served for m in r.methods
               if not _documented(document, r.path, m)]
    assert not missing
    assert "/sleep" not in document["paths"]  # a dev route: listed only when it exists
    assert "/tokenizer_info" not in document["paths"]  # --enable-tokenizer-info-endpoint only
    assert {"/v1/tokenize", "/v1/chat/completions/render", "/health_generate"} <= set(
        document["paths"])
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert not op.get("x-undocumented"), (method, path)
            assert "default" in op["responses"] and "200" in op["responses"]
    # the keys are required (bearer or x-api-key) except on the public routes
    assert document["security"] == [{"bearer": []}, {"x-api-key": []}]
    public = {r.path for r in ROUTES if r.public}
    assert {"/health", "/openapi.json", "/docs"} <= public
    for path in public:
        for op in document["paths"][path].values():
            assert op["security"] == []
    assert "security" not in document["paths"]["/v1/completions"]["post"]


def test_every_route_with_dev_endpoints_is_documented_offline():
    doc = build_document(api_keys=False, include_dev=True)
    validate(doc)
    assert all(_documented(doc, r.path, m) for r in ROUTES for m in r.methods)
    assert "security" not in doc  # no keys: nothing to send
    unused = [k for k in OPERATIONS if not any(k == (m, r.path) for r in ROUTES
                                               for m in r.methods)]
    assert not unused  # no operation documents a route that does not exist


def test_no_secret_in_the_document(document):
    text = str(document)
    for secret in (*API_KEYS, str(tiny_model_path("llama")), "tiny-alias"):
        assert secret not in text


def _examples(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for content in op.get("requestBody", {}).get("content", {}).values():
                for example in content.get("examples", {}).values():
                    yield path, method, op, content["schema"], example["value"]


def test_examples_fit_their_schemas_and_the_server_accepts_them(server, document):
    seen = 0
    for path, method, op, schema, value in _examples(document):
        jsonschema.Draft202012Validator({**schema, "components": document["components"]}
                                        ).validate(value)
        r = httpx.request(method.upper(), server.url + path, json=value, headers=auth(),
                          timeout=60)
        # the tiny llama generates: the pooling routes answer 501, as documented
        expected = 501 if "501" in op["responses"] else 200
        assert r.status_code == expected, (path, r.text)
        if expected == 200:
            schema_200 = op["responses"]["200"]["content"]["application/json"]["schema"]
            jsonschema.Draft202012Validator({**schema_200, "components":
                                             document["components"]}).validate(r.json())
        seen += 1
    assert seen >= 15


def test_a_value_outside_a_documented_bound_is_refused(server, document):
    schema = document["components"]["schemas"]["ResponsesRequest"]["properties"]["request_id"]
    pattern = next(s["pattern"] for s in schema["anyOf"] if "pattern" in s)
    assert not re.search(pattern, "a\r\nb")
    r = httpx.post(server.url + "/v1/responses", headers=auth(), timeout=30,
                   json={"input": "hi", "max_output_tokens": 2, "request_id": "a\r\nb"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"


def test_every_documented_path_is_routed(server, document):
    for path, item in document["paths"].items():
        url = server.url + path.replace("{model}", "tiny").replace("{response_id}", "resp_none")
        for method in item:
            if method == "post" and path in ("/v1/chat/completions", "/v1/completions"):
                continue  # covered by the examples; an empty body is enough elsewhere
            r = httpx.request(method.upper(), url, headers=auth(), timeout=60)
            assert r.status_code != 405, (method, path)
            if r.status_code == 404:
                assert not r.json()["error"]["message"].startswith("no route"), (method, path)


def test_docs_is_an_offline_page(server):
    r = httpx.get(server.url + "/docs", timeout=30)  # public, as /openapi.json
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "openapi.json" in page and "<script>" in page
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.I)  # no other host
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium; `make test` installs it "
                    "(make browser), so this is only skipped outside `make test`")
def test_docs_renders_every_operation_in_headless_chromium(server, document, tmp_path):
    """The page's own script fetches /openapi.json and lists each operation; every other host is
    unreachable (a dead proxy), so the page works offline. The served HTML holds no route."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path}", "--proxy-server=http://127.0.0.1:9",
         "--virtual-time-budget=10000", "--dump-dom", server.url + "/docs"],
        capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and "</main>" in dom, proc.stderr[-2000:]
    shown = set(re.findall(r'<span class="m (\w+)">\w+</span><span class="p">([^<]+)</span>',
                           dom))
    assert ("post", "/v1/chat/completions") in shown
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert shown == documented
    assert '<p id="err"></p>' in dom  # the page's own "could not load" line stayed empty
    assert "/v1/chat/completions" not in httpx.get(server.url + "/docs").text  # drawn by JS
