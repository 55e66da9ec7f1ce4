"""The offline API, compatible with vLLM's: LLM(model).generate(prompts, SamplingParams(...)).

It runs the same Scheduler and ModelRunner as the service stack, in one process and with no
sockets, and the same request processor (shared.processor) as the HTTP frontend: validation, the
model's defaults for the fields a SamplingParams leaves unset, n fan-out, stop strings, logprob
text and finish reasons are one piece of code, so a request gives the same result in both. This
module adds batching and tqdm. Bad input raises ValueError before anything is admitted (the
server's 400); a request that fails in the worker (e.g. a grammar that does not compile) fails
alone: its outputs finish with finish_reason "error" and the message in ``error`` (the server's
per-request error), and the others are returned.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from pagedserve.llm_pooling import PoolingAPI
from pagedserve.llm_ranks import LLMLifecycle, make_executor
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.prompts import PromptType, per_prompt, prompt_list, prompt_of
from services.engine.core import EngineCore
from shared.config import (
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shared.lora import LoRARequest, check_adapter
from shared.processor.chat import ChatOutput, ChatParsers, ChatPlan
from shared.processor.defaults import DEFAULT_MAX_TOKENS, REST_OF_CONTEXT
from shared.processor.processor import ModelFacts, RequestProcessor
from shared.processor.sequence import Sequence
from shared.processor.token_text import TokenText
from shared.processor.tokenizer import load_tokenizer
from shared.protocol import TokenLogprobs
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

LoRAType = LoRARequest | Seq[LoRARequest | None] | None


class LLM(PoolingAPI, LLMLifecycle):
    def __init__(
        self,
        model: str,
        *,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        block_size: int = 16,
        kv_cache_memory: int = 2 << 30,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        enforce_eager: bool = False,
        device: str | None = None,
        revision: str | None = None,
        scheduling_policy: str = "fcfs",
        kv_cache_dtype: str = "auto",
        speculative_config: dict[str, Any] | None = None,
        quantization: str | None = None,
        runner: str = "auto",
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 1,
        max_cpu_loras: int | None = None,
        async_scheduling: bool = False,
    ):
        """scheduling_policy: "fcfs", or "priority" (generate's priority list orders the requests:
        lower values first, and the largest are preempted first). speculative_config: vLLM's, e.g.
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}. runner: "generate",
        "pooling" (embed() and score(); a decoder pools its last token), or "auto" (encoders pool).
        enable_lora: serve PEFT LoRA adapters (generate's and chat's lora_request), up to
        max_lora_rank, at most max_loras different ones in a batch and max_cpu_loras kept loaded.
        async_scheduling: plan each step before the previous one's tokens are read (vLLM's flag). Off
        here, on in the service stack: in one process a step runs only when its result is read, so
        planning ahead overlaps nothing and only computes a token past each finish."""
        model_config = ModelConfig.from_pretrained(
            model, dtype=dtype, max_model_len=max_model_len, revision=revision, quantization=quantization,
            runner=runner,
        )
        self.config = EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                num_gpu_blocks_override=num_gpu_blocks_override,
                kv_cache_dtype=kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      policy=scheduling_policy, async_scheduling=async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size, 0, pipeline_parallel_size),
            compilation=CompilationConfig(enforce_eager=enforce_eager),
            seed=seed,
            speculative=SpeculativeConfig.parse(speculative_config),
            lora=LoRAConfig.if_enabled(enable_lora, max_lora_rank, max_loras, max_cpu_loras),
        )
        self.tokenizer = load_tokenizer(model_config.path)
        facts = ModelFacts(model_config.vocab_size, model_config.max_model_len, model_config.generation_defaults,
                           tuple(model_config.eos_token_ids))
        self.processor = RequestProcessor(self.tokenizer, facts)
        self.runner = make_executor(self.config, device)  # with several ranks, their processes
        self.engine = EngineCore(self.config, self.runner, self.runner.num_blocks)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.processor.sampling_params(SamplingParams(), [], DEFAULT_MAX_TOKENS)

    # ----- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
        lora_request: LoRAType = None,
    ) -> list[RequestOutput]:
        """priority: one value per prompt, with scheduling_policy="priority" (lower runs first).
        lora_request: the adapter every prompt runs with, or one (or None) per prompt.
        Fields a SamplingParams leaves unset take the model's generation_config defaults;
        max_tokens unset in both is 16."""
        prompts = prompt_list(prompts)
        token_lists = [self._tokenize(p) for p in prompts]
        texts = [p if isinstance(p, str) else p.get("prompt") for p in prompts]
        return self._run(texts, token_lists, sampling_params, use_tqdm, priority, DEFAULT_MAX_TOKENS,
                         lora_request=lora_request)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
        lora_request: LoRAType = None,
    ) -> list[RequestOutput]:
        """Conversations rendered with the model's chat template; max_tokens unset (here and in
        the model's defaults) runs to the end of the context, as the server's chat does.

        tools, tool_choice and parallel_tool_calls as in OpenAI's API (tool_choice "auto" needs
        tool_parser, e.g. "hermes"); chat_template_kwargs become template variables;
        continue_final_message (with add_generation_prompt=False) leaves the last message open for
        the model to continue, as vLLM's;
        reasoning_parser ("qwen3", "deepseek_r1") splits off the reasoning. With either parser or
        a forced tool_choice, each output also has content, reasoning_content and tool_calls, as
        the server's message."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        parsers = ChatParsers(tool_parser, reasoning_parser, enable_auto_tool_choice=tool_parser is not None)
        plans = [ChatPlan(parsers, conv, tools, tool_choice, parallel_tool_calls) for conv in conversations]
        token_lists = [self.processor.encode_chat(conv, add_generation_prompt, chat_template,
                                                  **plan.template_variables(chat_template_kwargs,
                                                                            continue_final_message))
                       for conv, plan in zip(conversations, plans)]
        texts = [self.tokenizer.decode(ids) for ids in token_lists]
        return self._run(texts, token_lists, sampling_params, use_tqdm, None, REST_OF_CONTEXT, plans, lora_request)

    # ----- internals ----------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> list[int]:
        given = prompt_of(prompt)
        return self.processor.encode(given) if isinstance(given, str) else given

    def _run(self, texts, token_lists, sampling_params, use_tqdm, priority, default_max_tokens,
             plans: list[ChatPlan] | None = None, lora_request: LoRAType = None) -> list[RequestOutput]:
        count = len(token_lists)
        params_list = [p or SamplingParams() for p in per_prompt(sampling_params, SamplingParams, "sampling_params", count)]
        priorities = [p or 0 for p in per_prompt(priority, int, "priority", count)]
        loras = self._loras(lora_request, count)
        if any(priorities) and self.config.scheduler.policy != "priority":
            raise ValueError('priority needs LLM(..., scheduling_policy="priority")')
        # Validate every request before admitting any, so a bad prompt leaves the engine untouched.
        outputs, sequences, requests = [], {}, []
        for i, (text, ids, params, prio, lora) in enumerate(zip(texts, token_lists, params_list, priorities, loras)):
            ids = self.processor.check_prompt(ids, truncate_prompt_tokens=params.truncate_prompt_tokens)
            params = self.processor.sampling_params(params, [ids], default_max_tokens)
            if plans is not None:
                params = plans[i].sampling_params(params)
            outputs.append(RequestOutput(str(next(self._ids)), text, ids))
            for seq in self.processor.sequences(outputs[-1].request_id, [ids], params):
                requests.append(self.engine.make_request(seq.req_id, ids, seq.params, priority=prio,
                                                         lora_request=lora))
                sequences[seq.req_id] = (len(outputs) - 1, seq)
        for request in requests:
            self.engine.add_request(request)
        self._drive(sequences, len(outputs), use_tqdm)
        texts = self.processor.token_text
        for index, seq in sequences.values():
            output = None if plans is None else plans[index].output(seq, self.tokenizer)
            outputs[index].outputs.append(_completion(seq, texts, output))
            if seq.prompt_logprobs is not None and outputs[index].prompt_logprobs is None:
                outputs[index].prompt_logprobs = [None] + [_logprob_dict(lp, texts) for lp in seq.prompt_logprobs]
            outputs[index].num_cached_tokens = max(outputs[index].num_cached_tokens, seq.num_cached_tokens)
        for out in outputs:
            out.outputs.sort(key=lambda c: c.index)
            out.finished = True
        return outputs

    def _loras(self, lora_request: LoRAType, count: int) -> list[LoRARequest | None]:
        """One adapter (or None) per prompt, each checked against the model before any request is
        admitted (ValueError: LoRA not enabled, too high a rank, modules the model lacks, bad files)."""
        loras = per_prompt(lora_request, LoRARequest, "lora_request", count)
        for lora in dict.fromkeys(x for x in loras if x is not None):
            if self.config.lora is None:
                raise ValueError("lora_request needs LLM(..., enable_lora=True)")
            check_adapter(lora.lora_path, self.config.model.hf_config, self.config.lora.max_lora_rank)
        return loras

    def _drive(self, sequences: dict[str, tuple[int, Sequence]], num_prompts: int, use_tqdm: bool) -> None:
        bar = tqdm(total=num_prompts, desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        remaining = {}
        for index, _ in sequences.values():
            remaining[index] = remaining.get(index, 0) + 1
        generated = 0
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    index, seq = sequences[delta.req_id]
                    was_finished = seq.finished
                    generated += len(delta.new_token_ids)
                    if seq.add(delta):  # a stop string the engine could not check
                        self.engine.abort([delta.req_id])
                    if seq.finished and not was_finished:
                        remaining[index] -= 1
                        if remaining[index] == 0:
                            bar.update(1)
                rate = generated / bar.format_dict["elapsed"] if bar.format_dict["elapsed"] else 0.0
                bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
        except BaseException:
            self.engine.abort([rid for rid, (_, s) in sequences.items() if not s.finished])
            raise
        finally:
            bar.close()


def _completion(seq: Sequence, texts: TokenText, chat: ChatOutput | None = None) -> CompletionOutput:
    logprobs = None
    if seq.params.logprobs is not None:
        logprobs = [_logprob_dict(lp, texts) for lp in seq.logprobs]
    out = CompletionOutput(
        index=seq.index,
        text=seq.text,
        token_ids=list(seq.token_ids),
        cumulative_logprob=seq.cumulative_logprob(),
        logprobs=logprobs,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        error=seq.error,
    )
    if chat is not None and chat.parser is not None:  # parsed as the server's chat message
        message = chat.message()
        out.content, out.reasoning_content = message.content, message.reasoning_content
        out.tool_calls, out.finish_reason = message.tool_calls, chat.finish_reason
    return out


def _logprob_dict(lp: TokenLogprobs, texts: TokenText) -> dict[int, Logprob]:
    """vLLM's shape for one position: the chosen token with its rank, then the top tokens."""
    entry = {lp.token_ids[0]: Logprob(lp.logprobs[0], lp.rank, texts.text(lp.token_ids[0]))}
    for rank, (tok, val) in enumerate(zip(lp.token_ids[1:], lp.logprobs[1:]), start=1):
        entry.setdefault(tok, Logprob(val, rank, texts.text(tok)))
    return entry
