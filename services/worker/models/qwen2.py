"""Qwen2 / Qwen2.5: the Llama architecture with a bias on the q/k/v projections only."""

from __future__ import annotations

from typing import Any

from services.worker.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def biases(hf_config: dict[str, Any]) -> tuple[bool, bool]:
        return True, False


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2Attention

    @staticmethod
    def sliding_window(hf_config: dict[str, Any]) -> int | None:
        return hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
