"""A cross-encoder (random-weight BertForSequenceClassification) through the real stack (engine,
worker and frontend processes): /v1/score and /v1/rerank give the offline LLM.score scores, the
model card says classify, /v1/embeddings names the endpoints that fit, and hostile bodies are a
400 while the frontend serves on."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from e2e_stack import running_stack

from pagedserve.llm import LLM
from pagedserve.test_encoder_model import make_encoder_model

pytestmark = pytest.mark.timeout(300)
QUERY = "a fox"
DOCS = ["the quick brown fox", "tax law in 1850", "foxes are quick", "paged attention in blocks"]
PAIRS_1 = ["a fox", "tax", "blocks of memory"]
PAIRS_2 = ["foxes are quick", "law in 1850", "paged attention"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_encoder_model(tmp_path_factory.mktemp("xenc"), "bert-cross-encoder"))


@pytest.fixture(scope="module")
def base(model, tmp_path_factory) -> Iterator[str]:
    with running_stack(model, tmp_path_factory.mktemp("xenc-logs"), "fe-xenc",
                       engine_flags=("--max-num-batched-tokens", "512")) as st:
        yield st.base


@pytest.fixture(scope="module")
def offline(model) -> dict[str, list]:
    """The same pairs scored offline (LLM.score itself is checked against transformers)."""
    llm = LLM(model)
    return {"one": llm.score(QUERY, DOCS, use_tqdm=False), "pairs": llm.score(PAIRS_1, PAIRS_2, use_tqdm=False)}


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=60)


def test_models_say_classify(base, model):
    (card,) = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    assert card["id"] == model and card["task"] == "classify"


@pytest.mark.parametrize(("body", "key"), [({"text_1": QUERY, "text_2": DOCS}, "one"),
                                           ({"text_1": PAIRS_1, "text_2": PAIRS_2}, "pairs")])
def test_score_matches_offline(base, offline, body, key):
    out = post(base, "/v1/score", body)
    assert out.status_code == 200, out.text
    got = out.json()
    ref = offline[key]
    assert got["object"] == "list" and [d["index"] for d in got["data"]] == list(range(len(ref)))
    np.testing.assert_allclose([d["score"] for d in got["data"]], [r.outputs.score for r in ref], atol=1e-5)
    tokens = sum(len(r.prompt_token_ids) for r in ref)  # each pair encoded together, as offline
    assert got["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_rerank_orders_by_offline_scores(base, offline):
    ref = [r.outputs.score for r in offline["one"]]
    assert np.ptp(ref) > 1e-3  # scores far enough apart that a wrong pairing or order shows

    def check(results: list[dict], n: int) -> None:
        idx = [r["index"] for r in results]
        got = [r["relevance_score"] for r in results]
        assert len(idx) == n and len(set(idx)) == n and got == sorted(got, reverse=True)
        np.testing.assert_allclose(got, [ref[i] for i in idx], atol=1e-5)
        assert all(ref[i] <= min(got) + 1e-5 for i in range(len(DOCS)) if i not in idx)  # top_n kept the best

    full = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()
    check(full["results"], len(DOCS))
    assert [r["document"]["text"] for r in full["results"]] == [DOCS[r["index"]] for r in full["results"]]
    top = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}).json()
    check(top["results"], 2)
    assert all("document" not in r for r in top["results"])
    many = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 99}).json()
    check(many["results"], len(DOCS))


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/rerank", {"query": QUERY, "documents": "the quick brown fox"}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": [1, 2]}, "documents"),
    ("/v1/rerank", {"query": "", "documents": DOCS}, "query"),
    ("/v1/score", {"text_1": PAIRS_1, "text_2": DOCS}, "text_2"),
    ("/v1/score", {"text_1": QUERY, "text_2": []}, "text_2"),
    ("/v1/score", {"text_1": QUERY, "text_2": DOCS, "truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),
])
def test_hostile_bodies_get_400_and_the_frontend_serves_on(base, offline, path, body, param):
    resp = post(base, path, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text
    ok = post(base, "/v1/score", {"text_1": QUERY, "text_2": DOCS[0]})
    assert ok.status_code == 200
    assert np.isclose(ok.json()["data"][0]["score"], offline["one"][0].outputs.score, atol=1e-5)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/completions"])
def test_wrong_endpoint_names_the_ones_that_fit(base, path):
    body = {"input": "hello"} if path == "/v1/embeddings" else {"prompt": "hello", "max_tokens": 2}
    resp = post(base, path, body)
    assert resp.status_code == 400, resp.text
    msg = resp.json()["error"]["message"]
    assert "cross-encoder" in msg and "/v1/score, /v1/rerank or /classify" in msg
