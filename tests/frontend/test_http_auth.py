"""The API key through a real frontend behind a path-based proxy (--root-path): the tokenizer
endpoints and /v1/* want it (as a Bearer token, or Anthropic's x-api-key), the ops endpoints do
not; odd Authorization headers get 401 on every keyed route; a 401 is counted by route."""

from __future__ import annotations

import json

import httpx
import pytest
from frontend_helpers import metric_value, wait_until

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(180)

KEY = "sekrit"


@pytest.fixture(scope="module")
def keyed(stack) -> str:
    """A frontend with an API key, behind a path-based proxy: the routes stay where they are, and so must the key."""
    port = free_port()
    proc = stack.start_frontend("fe-keyed", "--api-key", KEY, "--root-path", "/proxied", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


def _post(url: str, body: object) -> httpx.Response:
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def _unauthorized(resp: httpx.Response) -> bool:
    """A 401 in OpenAI's shape saying the key is wrong or missing."""
    assert resp.status_code == 401, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None, err
    return err["code"] == "invalid_api_key"


def test_tokenizer_endpoints_need_the_key_ops_endpoints_do_not(keyed):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]}),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 1})):
        resp = _post(f"{keyed}{path}", body)
        assert _unauthorized(resp)
        assert resp.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(f"{keyed}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert ok.status_code == 200, ok.text
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{keyed}{path}", timeout=10).status_code == 200


ODD_AUTHORIZATIONS = [
    [(b"authorization", b"")],
    [(b"authorization", b"Bearer")],
    [(b"authorization", b"bearer")],
    [(b"authorization", KEY.encode())],  # no scheme
    [(b"authorization", b"Basic " + KEY.encode())],
    [(b"authorization", b"Bearer\t" + KEY.encode())],
    [(b"authorization", "Bearer sékrit".encode())],  # non-ASCII, UTF-8 and Latin-1
    [(b"authorization", "Bearer sékrit".encode("latin-1"))],
    [(b"authorization", b"Bearer " + b"k" * 8000)],
    [(b"x-api-key", b"wrong")],  # Anthropic's header: the key itself, once
    [(b"x-api-key", KEY.encode()), (b"x-api-key", KEY.encode())],
    [(b"authorization", b"Bearer wrong"), (b"x-api-key", KEY.encode())],  # a Bearer token decides
    [(b"authorization", b"Bearer wrong"), (b"authorization", f"Bearer {KEY}".encode())],  # two: ambiguous
    [(b"authorization", f"Bearer {KEY}".encode()), (b"authorization", b"Bearer wrong")],
]
KEYED_ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"messages": [], "max_tokens": 1}),
                ("POST", "/v1/embeddings", {"input": "hi"}), ("POST", "/v1/responses", {"input": "hi"}),
                ("GET", "/v1/responses/resp_1", None), ("POST", "/tokenize", {"prompt": "hi"})]


@pytest.mark.parametrize("headers", ODD_AUTHORIZATIONS)
def test_odd_authorization_headers_get_401_on_every_keyed_route(keyed, headers):
    for method, path, body in KEYED_ROUTES:
        resp = httpx.request(method, f"{keyed}{path}", json=body, headers=headers, timeout=30)
        assert _unauthorized(resp), (method, path)


def test_the_key_is_checked_under_the_root_path_and_counted_by_route(keyed):
    """With --root-path the ASGI path carries the prefix: the key was once not asked for at all."""
    before = metric_value(httpx.get(f"{keyed}/metrics").text, "pagedserve_frontend_http_responses_total",
                          endpoint="/v1/models", status="401")
    assert _unauthorized(httpx.get(f"{keyed}/v1/models", timeout=10))
    for scheme in ("Bearer", "bearer", "BEARER"):
        resp = httpx.get(f"{keyed}/v1/models", headers={"authorization": f"{scheme}  {KEY}"}, timeout=10)
        assert resp.status_code == 200, resp.text
    assert httpx.get(f"{keyed}/v1/models", headers={"x-api-key": KEY}, timeout=10).status_code == 200
    after = metric_value(httpx.get(f"{keyed}/metrics").text, "pagedserve_frontend_http_responses_total",
                         endpoint="/v1/models", status="401")
    assert after - before == 1
