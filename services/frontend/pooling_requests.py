"""Request and response bodies of the pooling endpoints: OpenAI's /v1/embeddings, vLLM's
/v1/score and /classify, and the Jina/Cohere-shaped /v1/rerank vLLM serves. Strict: a wrong type is a 400
naming the field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from services.frontend.errors import bad_request
from services.frontend.request_body import RequestBody

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Text = Annotated[str, Field(min_length=1)]


_SERVES = {
    "generate": "/v1/completions or /v1/chat/completions",
    "embed": "/v1/embeddings, /v1/score or /v1/rerank",
    "classify": "/v1/score, /v1/rerank or /classify",
}
# the endpoints only one pooling task serves
_TASK_OF = {"/v1/embeddings": "embed", "/v1/classify": "classify"}
def check_task(task: str, endpoint: str, pooling: bool, labels: int = 1) -> None:
    """400 when the model does not serve this kind of endpoint, naming the ones it does (a
    classifier of more than one label serves only /classify: it scores no pairs)."""
    if (task != "generate") != pooling or _TASK_OF.get(endpoint, task) != task:
        kind = {"generate": "a text generation model", "embed": "an embedding model",
                "classify": "a classification (cross-encoder) model"}.get(task, task)
        serves = _SERVES.get(task, "")
        if task == "classify" and labels > 1:
            kind, serves = f"a sequence classifier with {labels} labels", "/classify"
        raise bad_request(f"This model is {kind}: it does not serve {endpoint}. Use {serves}.",
                          code="unsupported_endpoint")


class PoolingRequest(RequestBody):
    model: str | None = None
    user: str | None = None
    # vLLM's extra: keep this many tokens of each input (-1: max_model_len); unset, longer inputs get a 400
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class EmbeddingRequest(PoolingRequest):
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=1 << 20)


class ClassificationRequest(PoolingRequest):
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(min_length=1)


class ScoreRequest(PoolingRequest):
    text_1: Text | list[Text] = Field(min_length=1)
    text_2: Text | list[Text] = Field(min_length=1)


class RerankRequest(PoolingRequest):
    query: Text
    documents: list[Text] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None
    relevance_score: float


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: PoolingUsage
    results: list[RerankResult]
