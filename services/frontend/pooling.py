"""POST /v1/embeddings, /v1/score, /v1/rerank and /classify: pooling requests through the same
engine client as generation (one engine request per input, finished with its pooled vector).

A cross-encoder scores each (query, document) pair together; an embedding model scores by the
cosine of the two embeddings. The wrong endpoint for the model is a 400 naming the ones that fit.
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from services.frontend.errors import bad_request, from_value_error
from services.frontend.openai_responses import now, random_id
from services.frontend.pooling_requests import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingRequest,
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from services.frontend.state import FrontendState
from services.frontend.streaming import respond_whole
from shared.pooling import PoolingParams
from shared.processor.pooling import (
    POOLING_SAMPLING,
    PoolingInputs,
    check_cross_encoder,
    cosine,
    pair_up,
    resolve_truncation,
)
from shared.processor.sequence import Sequence


class _Pooling:
    """One pooling endpoint call: checks, tokenization off the event loop, and the engine run."""

    def __init__(self, state: FrontendState, body: PoolingRequest, endpoint: str, num_inputs: int,
                 inputs_param: str = "input"):
        """inputs_param: the field that holds the inputs (named by the 400 for too many)."""
        self.arrival = time.monotonic()
        self.state, self.endpoint = state, endpoint
        self.model = state.check_model(body.model)
        state.check_endpoint(endpoint, pooling=True)
        info = state.require_ready()
        self.task, self.labels = info.task, info.labels
        limit = state.config.limits.max_prompts_per_request
        if num_inputs > limit:
            raise bad_request(f"A request may hold at most {limit} inputs on this server, got {num_inputs}.",
                              inputs_param)
        try:
            self.truncate = resolve_truncation(body.truncate_prompt_tokens, info.max_model_len)
        except ValueError as exc:
            raise from_value_error(exc, set()) from None
        self.inputs = PoolingInputs(state.tokenizer, info.vocab_size, info.max_model_len)

    async def encode(self, fn, items: list) -> list:
        try:
            return await asyncio.to_thread(lambda: [fn(item) for item in items])
        except ValueError as exc:
            raise from_value_error(exc, set()) from None

    async def run(self, request: Request, ids: list[list[int]], pooling: list[PoolingParams], build) -> Response:
        gen = self.state.generation(ids, POOLING_SAMPLING, self.endpoint, self.arrival, pooling=pooling)
        usage = PoolingUsage(prompt_tokens=sum(map(len, ids)), total_tokens=sum(map(len, ids)))
        return await respond_whole(gen, request, lambda seqs: build(seqs, usage))

    async def score(self, request: Request, pairs: list[tuple[str, str]], build) -> Response:
        """Score each pair; build(scores, usage) makes the response."""
        if self.task == "classify":
            try:
                check_cross_encoder(self.labels)
            except ValueError as exc:
                raise from_value_error(exc, set()) from None
            encoded = await self.encode(lambda p: self.inputs.encode_pair(p[0], p[1], self.truncate), pairs)
            pooling = [PoolingParams(segment_start=start) for _, start in encoded]
            return await self.run(request, [ids for ids, _ in encoded], pooling,
                                  lambda seqs, usage: build([s.pooled[0] for s in seqs], usage))
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each text embedded once
        ids = await self.encode(lambda t: self.inputs.encode(t, self.truncate, "documents"), texts)

        def scores(seqs: list[Sequence], usage: PoolingUsage) -> Response:
            vectors = dict(zip(texts, (s.pooled for s in seqs)))
            return build([cosine(vectors[q], vectors[d]) for q, d in pairs], usage)

        return await self.run(request, ids, [PoolingParams()] * len(ids), scores)


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


def _inputs(body: EmbeddingRequest | ClassificationRequest) -> list:
    """The request's inputs, one per pooled vector: texts or token id lists."""
    items = body.input
    return [items] if isinstance(items, str) or (items and isinstance(items[0], int)) else items


async def create_embedding(state: FrontendState, body: EmbeddingRequest, request: Request) -> Response:
    items = _inputs(body)
    call = _Pooling(state, body, "/v1/embeddings", len(items))
    ids = await call.encode(lambda x: call.inputs.encode(x, call.truncate), items)

    def build(seqs: list[Sequence], usage: PoolingUsage) -> Response:
        data = [EmbeddingData(index=i, embedding=_encoded(s.pooled, body.encoding_format)) for i, s in enumerate(seqs)]
        return _json(EmbeddingResponse(model=call.model, data=data, usage=usage))

    return await call.run(request, ids, [PoolingParams(dimensions=body.dimensions)] * len(ids), build)


async def create_classify(state: FrontendState, body: ClassificationRequest, request: Request) -> Response:
    items = _inputs(body)
    call = _Pooling(state, body, "/v1/classify", len(items))
    ids = await call.encode(lambda x: call.inputs.encode(x, call.truncate), items)
    labels = state.require_ready().labels

    def build(seqs: list[Sequence], usage: PoolingUsage) -> Response:
        data = []
        for i, seq in enumerate(seqs):
            best = int(np.argmax(seq.pooled))
            label = labels[best] if best < len(labels) else f"LABEL_{best}"
            data.append(ClassificationData(index=i, label=label, probs=seq.pooled, num_classes=len(seq.pooled)))
        return _json(ClassificationResponse(id=random_id("classify"), created=now(), model=call.model, data=data,
                                            usage=usage))

    return await call.run(request, ids, [PoolingParams()] * len(ids), build)


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_score(state: FrontendState, body: ScoreRequest, request: Request) -> Response:
    queries = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    documents = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    call = _Pooling(state, body, "/v1/score", len(queries) + len(documents), "text_2")
    try:
        pairs = pair_up(queries, documents)
    except ValueError as exc:
        raise from_value_error(exc, set()) from None

    def build(scores: list[float], usage: PoolingUsage) -> Response:
        data = [ScoreData(index=i, score=s) for i, s in enumerate(scores)]
        return _json(ScoreResponse(id=random_id("score"), created=now(), model=call.model, data=data, usage=usage))

    return await call.score(request, pairs, build)


async def create_rerank(state: FrontendState, body: RerankRequest, request: Request) -> Response:
    call = _Pooling(state, body, "/v1/rerank", len(body.documents) + 1, "documents")

    def build(scores: list[float], usage: PoolingUsage) -> Response:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=body.documents[i]) if body.return_documents else None)
                   for i in order]
        return _json(RerankResponse(id=random_id("rerank"), model=call.model, usage=usage, results=results))

    return await call.score(request, [(body.query, d) for d in body.documents], build)
