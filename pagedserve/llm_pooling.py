"""The offline pooling API, vLLM's: LLM(model, runner="pooling").embed(prompts),
.score(query, documents) and, for a sequence classifier, .classify(prompts). Pooling requests go
through the same engine core as generation, each computed whole in one step; a cross-encoder
scores (query, document) pairs, an embedding model the cosine of their embeddings."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from pagedserve.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagedserve.prompts import PromptType, prompt_list, prompt_of, texts_of
from shared.pooling import PoolingParams
from shared.processor.pooling import (
    POOLING_SAMPLING,
    PoolingInputs,
    check_cross_encoder,
    cosine,
    pair_up,
    resolve_truncation,
)


class PoolingAPI:
    """Mixed into LLM (which sets config, tokenizer, engine and _ids)."""

    def _pooling_inputs(self) -> PoolingInputs:
        m = self.config.model
        return PoolingInputs(self.tokenizer, m.vocab_size, m.max_model_len)

    def embed(
        self,
        prompts: PromptType | Seq[PromptType],
        *,
        truncate_prompt_tokens: int | None = None,
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (a str, or a dict with 'prompt' or 'prompt_token_ids');
        pooling_params.dimensions cuts a matryoshka embedding."""
        self._require_task("embed", "embed")
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise ValueError(f"pooling_params must be a PoolingParams (or None), got {pooling_params!r}")
        results = self._pool_prompts(prompts, truncate_prompt_tokens, pooling_params or PoolingParams(), use_tqdm)
        return [EmbeddingRequestOutput(rid, ids, EmbeddingOutput(vec)) for rid, ids, vec in results]

    def classify(
        self,
        prompts: PromptType | Seq[PromptType],
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt from a sequence classifier (outputs.probs, in the
        order of the checkpoint's id2label)."""
        self._require_task("classify", "classify")
        results = self._pool_prompts(prompts, truncate_prompt_tokens, PoolingParams(), use_tqdm)
        return [ClassificationRequestOutput(rid, ids, ClassificationOutput(vec)) for rid, ids, vec in results]

    def _pool_prompts(self, prompts: PromptType | Seq[PromptType], truncate_prompt_tokens: int | None,
                      params: PoolingParams, use_tqdm: bool) -> list[tuple[str, list[int], list[float]]]:
        """(request id, token ids, pooled vector) of each prompt."""
        prompts = prompt_list(prompts)
        truncate = resolve_truncation(truncate_prompt_tokens, self.config.model.max_model_len)
        inputs = self._pooling_inputs()
        token_lists = [inputs.encode(prompt_of(p), truncate, "prompt") for p in prompts]
        vectors = self._pool([(ids, params) for ids in token_lists], use_tqdm)
        return [(rid, ids, vec) for (rid, vec), ids in zip(vectors, token_lists)]

    def score(
        self,
        data_1: str | Seq[str],
        data_2: str | Seq[str],
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """Scores of (query, document) pairs: one query against every document, or pair by pair.
        A cross-encoder scores each pair together; an embedding model by cosine similarity."""
        task = self.config.model.task
        if task == "generate":
            raise ValueError("score needs a pooling model (an embedding model or a cross-encoder)")
        queries, documents = texts_of(data_1, "data_1"), texts_of(data_2, "data_2")
        pairs = pair_up(queries, documents)
        truncate = resolve_truncation(truncate_prompt_tokens, self.config.model.max_model_len)
        inputs = self._pooling_inputs()
        if task == "classify":
            check_cross_encoder(self.config.model.class_labels)
            encoded = [inputs.encode_pair(q, d, truncate) for q, d in pairs]
            results = self._pool([(ids, PoolingParams(segment_start=s)) for ids, s in encoded], use_tqdm)
            return [ScoringRequestOutput(rid, ids, ScoringOutput(vec[0]))
                    for (rid, vec), (ids, _) in zip(results, encoded)]
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each text embedded once
        token_lists = [inputs.encode(t, truncate) for t in texts]
        vectors = dict(zip(texts, (v for _, v in self._pool([(ids, PoolingParams()) for ids in token_lists],
                                                               use_tqdm))))
        return [ScoringRequestOutput(str(next(self._ids)), [], ScoringOutput(cosine(vectors[q], vectors[d])))
                for q, d in pairs]

    def _require_task(self, task: str, method: str) -> None:
        if self.config.model.task != task:
            what = "generates text" if self.config.model.task == "generate" else f"is a {self.config.model.task} model"
            if task == "embed":
                raise ValueError(f"{method}() needs an embedding model; this model {what} "
                                 "(LLM(model, runner='pooling') makes a decoder an embedding model)")
            raise ValueError(f"{method}() needs a sequence classification model; this model {what}")

    def _pool(self, requests: list[tuple[list[int], PoolingParams]], use_tqdm: bool) -> list[tuple[str, list[float]]]:
        """Run pooling requests through the engine: (request id, pooled vector) in input order.
        Every request is validated before any is admitted."""
        ids = [str(next(self._ids)) for _ in requests]
        made = [self.engine.make_request(rid, tokens, POOLING_SAMPLING, pooling=params)
                for rid, (tokens, params) in zip(ids, requests)]
        for request in made:
            self.engine.add_request(request)
        results: dict[str, list[float]] = {}
        bar = tqdm(total=len(made), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    if delta.finish_reason is not None and delta.pooled is None:
                        raise RuntimeError(f"request {delta.req_id} failed: {delta.error or delta.finish_reason}")
                    if delta.pooled is not None:
                        results[delta.req_id] = delta.pooled
                        bar.update(1)
        except BaseException:
            self.engine.abort([rid for rid in ids if rid not in results])
            raise
        finally:
            bar.close()
        return [(rid, results[rid]) for rid in ids]
