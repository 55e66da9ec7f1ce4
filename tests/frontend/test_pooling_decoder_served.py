"""A decoder (the tiny llama checkpoint) served as an embedding model with --runner pooling, through
the real stack: embeddings of texts and of their token ids agree, dimensions and base64 cut and
carry the same vector, and hostile inputs get a 400 that names the place and says what is wrong
while the frontend serves on."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from e2e_stack import ENGINE_FLAGS, running_stack

pytestmark = pytest.mark.timeout(300)

VOCAB_SIZE, HIDDEN_SIZE = 1024, 64  # the tiny llama checkpoint's


@pytest.fixture(scope="module")
def base(model_path, tmp_path_factory) -> Iterator[str]:
    with running_stack(model_path, tmp_path_factory.mktemp("decoder-pooling-logs"), "fe-dec-pool",
                       engine_flags=(*ENGINE_FLAGS, "--runner", "pooling")) as st:
        yield st.base


def _embed(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)


def test_texts_token_ids_dimensions_and_base64_agree(base, model_tokenizer):
    text = "paged attention in blocks"
    ids = model_tokenizer(text)["input_ids"]
    by_text = _embed(base, input=text).json()
    assert by_text["usage"]["prompt_tokens"] == len(ids)
    whole = by_text["data"][0]["embedding"]
    both = _embed(base, input=[ids, ids[:2]], encoding_format="base64").json()
    vec = np.frombuffer(base64.b64decode(both["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, whole, atol=1e-6)
    assert [d["index"] for d in both["data"]] == [0, 1]
    cut = _embed(base, input=text, dimensions=8).json()["data"][0]["embedding"]
    assert len(cut) == 8 and np.isclose(np.linalg.norm(cut), 1.0)
    np.testing.assert_allclose(cut, np.array(whole[:8]) / np.linalg.norm(whole[:8]), atol=1e-6)


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/v1/embeddings", {"input": ""}, "input", "'input': String should have at least 1 character"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input", "'input[1]': String should have at least 1 character"),
    ("/v1/embeddings", {"input": [5, -1]}, "input", "'input[1]': Input should be greater than or equal to 0"),
    ("/v1/embeddings", {"input": [[1, 2], [-5]]}, "input", "'input[1][0]': Input should be greater than or equal"),
    ("/v1/embeddings", {"input": [VOCAB_SIZE]}, "input", f"out of range for a vocabulary of {VOCAB_SIZE}"),
    ("/v1/embeddings", {"input": [[1], [2**31]]}, "input", "'input[1][0]': Input should be less than or equal"),
    ("/v1/embeddings", {"input": [1, "a"]}, "input", "expected one of str, list[str], list[int], list[list[int]]"),
    ("/v1/embeddings", {"input": ["a"] * 65}, "input", "at most 64 inputs"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ("/v1/embeddings", {"input": "x", "dimensions": HIDDEN_SIZE + 1}, "dimensions",  # the engine's check
     f"at most this model's embedding size, {HIDDEN_SIZE}"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ("/v1/embeddings", {"input": [5] * 1025}, "input", "maximum context length is 1024 tokens"),
    ("/v1/score", {"text_1": "", "text_2": "b"}, "text_1", "'text_1': String should have at least 1 character"),
    ("/v1/rerank", {"query": "a", "documents": ["b"] * 64}, "documents", "at most 64 inputs"),
])
def test_hostile_inputs_get_400_naming_the_place_and_the_frontend_serves_on(base, path, body, param, says):
    """Inputs of a union's right type had been "expected one of constrained-str, ..." (a negative
    token id, an empty text)."""
    resp = httpx.post(f"{base}{path}", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert says in err["message"], err
    ok = _embed(base, input=["still", "here"])
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
