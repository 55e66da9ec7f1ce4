"""Model registry: the `architectures` name in config.json -> the class that implements it."""

from __future__ import annotations

from torch import nn

from services.worker.models.bert import BertForSequenceClassification, BertModel, XLMRobertaModel
from services.worker.models.llama import GemmaForCausalLM, LlamaForCausalLM, MistralForCausalLM
from services.worker.models.mixtral import MixtralForCausalLM
from services.worker.models.opt import OPTForCausalLM
from services.worker.models.qwen2 import Qwen2ForCausalLM
from services.worker.models.qwen3 import Qwen3ForCausalLM
from services.worker.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "XLMRobertaModel": XLMRobertaModel,
    "GemmaForCausalLM": GemmaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for an HF architecture name; ValueError naming the supported ones otherwise."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {supported}") from None
