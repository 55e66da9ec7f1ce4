"""Sequence classification (a random-weight three-label BertForSequenceClassification): offline
LLM.classify gives transformers' softmax probabilities, and the real stack's /classify (vLLM's
path; /v1/classify too) gives the same probabilities with the checkpoint's label names; the
wrong model or input is a ValueError offline and a 400 served, the frontend serving on."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from e2e_stack import running_stack

from pagedserve.llm import LLM
from pagedserve.test_encoder_model import CLASSIFIER_LABELS, make_encoder_model

pytestmark = pytest.mark.timeout(300)
TEXTS = ["the quick brown fox", "tax law in 1850", "foxes are quick", "paged attention in blocks"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_encoder_model(tmp_path_factory.mktemp("classifier"), "bert-classifier"))


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.softmax(hf(**tok(TEXTS, return_tensors="pt", padding=True)).logits, dim=-1).numpy()


@pytest.fixture(scope="module")
def base(model, tmp_path_factory) -> Iterator[str]:
    with running_stack(model, tmp_path_factory.mktemp("classifier-logs"), "fe-classify",
                       engine_flags=("--max-num-batched-tokens", "512")) as st:
        yield st.base


def test_offline_classify_matches_transformers(model, reference, model_path):
    llm = LLM(model)
    out = llm.classify(TEXTS, use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in out], reference, rtol=1e-4, atol=1e-6)
    assert reference.min() > 1e-3  # no class so unlikely that its probability would say nothing
    assert {o.outputs.num_classes for o in out} == {3} and len({o.request_id for o in out}) == 4
    with pytest.raises(ValueError, match="embedding model"):
        llm.embed("x", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        llm.classify([3.5], use_tqdm=False)
    for bad in (2.5, "3", True):  # had been a TypeError from the tokenizer, or a cut to one token (True)
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be an integer"):
            llm.classify("x", truncate_prompt_tokens=bad, use_tqdm=False)
    with pytest.raises(ValueError, match="3 labels"):  # not label 0's probability as a score
        llm.score("a query", ["a document"], use_tqdm=False)
    with pytest.raises(ValueError, match="sequence classification model; this model generates text"):
        LLM(str(model_path)).classify("x", use_tqdm=False)


def test_served_classify_gives_the_offline_probabilities_and_labels(base, model, reference):
    for path in ("/classify", "/v1/classify"):
        answer = httpx.post(f"{base}{path}", json={"model": model, "input": TEXTS}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "list" and body["id"].startswith("classify-") and body["usage"]["prompt_tokens"] > 4
        np.testing.assert_allclose([d["probs"] for d in body["data"]], reference, rtol=1e-4, atol=1e-6)
        assert [d["label"] for d in body["data"]] == [CLASSIFIER_LABELS[i] for i in np.argmax(reference, axis=1)]
        assert [(d["index"], d["num_classes"]) for d in body["data"]] == [(i, 3) for i in range(4)]
    one = httpx.post(f"{base}/classify", json={"model": model, "input": TEXTS[1]}, timeout=60).json()
    assert len(one["data"]) == 1 and one["data"][0]["label"] == CLASSIFIER_LABELS[int(np.argmax(reference[1]))]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": [[5, 10**6]]}, None),  # a token id past the vocabulary
    ({"input": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
])
def test_bad_classify_input_is_a_400(base, model, body, param):
    answer = httpx.post(f"{base}/classify", json={"model": model, **body}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert param is None or answer.json()["error"]["param"] == param
    assert httpx.post(f"{base}/classify", json={"model": model, "input": "ok"}, timeout=30).status_code == 200


def test_classify_on_an_embedding_or_generating_route_is_named(base, model, frontend):
    """The refusal sends a classifier of three labels to /classify alone: it had named /v1/score
    and /v1/rerank too, which refuse it; count_tokens had asked for a chat template."""
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/v1/completions", {"prompt": "x"})):
        wrong = httpx.post(f"{base}{path}", json={"model": model, **body}, timeout=30)
        assert wrong.status_code == 400 and wrong.json()["error"]["message"] == (
            f"This model is a sequence classifier with 3 labels: it does not serve {path}. Use /classify."), wrong.text
    ask = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    for path, body in (("/v1/messages", {**ask, "max_tokens": 2}), ("/v1/messages/count_tokens", ask)):
        wrong = httpx.post(f"{base}{path}", json=body, timeout=30)
        assert wrong.status_code == 400 and wrong.json() == {"type": "error", "error": {
            "type": "invalid_request_error",
            "message": f"This model is a sequence classifier with 3 labels: it does not serve {path}. Use /classify."}}
    generating = httpx.post(f"{frontend}/classify", json={"input": "x"}, timeout=30)
    assert generating.status_code == 400 and generating.json()["error"]["code"] == "unsupported_endpoint"


@pytest.mark.parametrize(("path", "body"), [
    ("/score", {"text_1": "a query", "text_2": ["a document", "another"]}),
    ("/v1/rerank", {"query": "a query", "documents": ["a document"]}),
])
def test_a_classifier_of_three_labels_does_not_score_pairs(base, model, path, body):
    """It had answered label 0's probability as each pair's score."""
    answer = httpx.post(f"{base}{path}", json={"model": model, **body}, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unsupported_endpoint" and "3 labels" in error["message"]
    assert "classify" in error["message"] and "cross-encoder" in error["message"]
