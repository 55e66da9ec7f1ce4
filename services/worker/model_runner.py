"""The model runner: weights, paged KV cache tensors, one batched forward per step, then sampling
(step_outputs.py) and proposals (proposals.py).

On CUDA the KV cache is sized by a profiling step (memory_profiler.py) and decode and verify steps
replay CUDA graphs (cuda_graphs.py) unless enforce_eager is set; every other step, and every
step on CPU, runs the model eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from services.worker import step_threads
from services.worker.cuda_graphs import DecodeGraphs, capture_decode_graphs
from services.worker.distributed import world_all_gather_object
from services.worker.eagle_runner import create_drafter
from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.input_batch import StepInputs, flatten
from services.worker.kv_cache import allocate_kv_cache, kv_block_bytes
from services.worker.layers.attention import select_backend
from services.worker.layers.encoder_attention import EncoderMetadata
from services.worker.loader import build_model, resolve_dtype
from services.worker.lora.layer import LoRAMapping
from services.worker.lora.manager import LoRAManager, prepare_adapters
from services.worker.memory_profiler import MemoryProfile, profile_cuda_memory
from services.worker.pipeline import Activations, Intermediate, Outcome, StageLink
from services.worker.pooler import Pooler
from services.worker.proposals import WorkerProposer
from services.worker.quant.kv_fp8 import check_kv_cache_dtype, kv_cache_torch_dtype
from services.worker.quant.kv_scales import prepare_kv_scales
from services.worker.request_checks import WorkerLimits
from services.worker.request_table import RequestTable
from services.worker.stats_log import startup_phase
from services.worker.step_outputs import StepOutputs
from services.worker.structured_output import StructuredOutputs
from shared.config import EngineConfig
from shared.protocol import StepPlan, StepResult

log = logging.getLogger(__name__)

def parse_device(device: str) -> torch.device:
    """The torch device of a --device or LLM(device=...) value: cpu, cuda or cuda:N this machine
    has (ValueError otherwise)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} is not there: this machine's torch sees "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return parsed


@dataclass
class StepStats:
    phase: str  # "prefill", "decode" or "mixed"
    num_reqs: int
    num_tokens: int
    forward_s: float
    sampling_s: float


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches and graph capture use the current device
        self.dtype = resolve_dtype(config.model, self.device)
        torch.manual_seed(config.seed)
        with startup_phase("loading the model weights"):
            self.model = build_model(config.model, self.dtype, self.device)
        self.encoder = getattr(self.model, "is_encoder", False)  # no KV cache, bidirectional attention
        self.pooler = Pooler(config.model.pooler, self.model) if config.model.pooler else None
        self.lora = None if config.lora is None else LoRAManager(
            self.model, config.lora, config.model.hf_config, self.dtype
        )
        self.kv_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, self.dtype)
        self.backend = select_backend(self.device, self.dtype, config.compilation.attention_backend, self.kv_dtype)
        check_kv_cache_dtype(config.cache.kv_cache_dtype, self.backend.name, self.device)
        prepare_kv_scales(self.model, self.backend, config, self.dtype, self.device, self.kv_dtype)
        self.memory_profile: MemoryProfile | None = None  # set on CUDA by the profiling step
        self.draft = create_drafter(config, self.dtype, self.device, self.backend, self.model)  # a draft model or head
        with startup_phase("sizing and allocating the KV cache"):
            self.num_blocks = self._measure_num_blocks()
            self.kv_caches = [] if self.encoder else allocate_kv_cache(config, self.num_blocks, self.kv_dtype, self.device)
            if self.draft is not None:
                self.draft.allocate(self.num_blocks)
        capturing = self.device.type == "cuda" and not config.compilation.enforce_eager and not self.pooler
        with startup_phase("capturing CUDA graphs", logged=capturing):  # a pooling model never decodes
            self.decode_graphs: DecodeGraphs | None = capture_decode_graphs(
                config, self.device, self.backend, self.model, self.kv_caches
            ) if self.pooler is None else None
        m = config.model
        self.structured = StructuredOutputs(m.path, m.vocab_size, list(m.eos_token_ids))
        limits = WorkerLimits(m.vocab_size, self.num_blocks, config.cache.block_size, m.max_model_len,
                              pooling=self.pooler is not None)
        self.proposer = WorkerProposer(config, self.draft)  # speculative proposals made here
        self.table = RequestTable(limits, self.structured, self.proposer)
        self.outputs = StepOutputs(self.model, self.table, self.structured, self.draft, self.device)
        p = config.parallel
        self.stage = StageLink(p, self.device) if p.pipeline_parallel_size > 1 else None
        self.answers = p.rank == p.result_rank  # this rank's results go to the engine
        self.last_stats: StepStats | None = None
        log.info("model runner ready: %s on %s, %d KV blocks of %s", self.dtype, self.device, self.num_blocks,
                 self.kv_dtype)

    def _measure_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if self.encoder:  # no KV kept: blocks only count the scheduler's tokens
            return self.config.scheduler.max_num_seqs * -(-self.config.model.max_model_len // cache.block_size)
        # a draft model keeps its KV beside the target's in every block, and a few scratch blocks
        per_block = kv_block_bytes(self.config, self.kv_dtype) + (self.draft.block_bytes if self.draft else 0)
        reserved = self.draft.scratch_bytes if self.draft else 0
        if self.device.type == "cuda":
            self.memory_profile = profile_cuda_memory(self.model, self.backend, self.config, self.dtype, self.device)
            return max(0, self.memory_profile.kv_budget - reserved) // per_block
        # On CPU the budget is a ceiling: no more than every running sequence at full length needs.
        bs, m = cache.block_size, self.config.model
        most = self.config.scheduler.max_num_seqs * -(-m.max_model_len // bs)
        return min(most, int(max(0, cache.kv_cache_memory - reserved) // per_block))

    def reset(self) -> None:
        """Forget every request (a new engine starts from scratch; the KV tensors stay)."""
        while self.stage is not None and self.stage.pending:  # keep the outcome channel in step
            self.stage.take()
        self.table.clear()
        self.proposer.reset()

    @property
    def stage_wait_s(self) -> float:
        """Seconds spent so far blocked receiving from other pipeline stages (0 without stages)."""
        return self.stage.wait_s if self.stage is not None else 0.0

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. A request whose own inputs, grammar or sampling go wrong is left out of
        the result and reported in StepResult.failed; the others get their tokens."""
        self.last_stats = None  # until this step has run
        self.table.take_failed()  # left only by a step that raised: the engine failed all of its requests
        if self.stage is not None and not self.stage.last:
            self._take_outcomes(plan)
        self.table.apply(plan)
        self._agree_on_refusals(plan)
        start = time.perf_counter()
        scheduled, lora = prepare_adapters(self.lora, self.table.runnable(plan), self.table.fail, self.device)
        if not scheduled:  # nothing runnable: only refusals to report
            return StepResult(plan.step_id, [], [], failed=self.table.take_failed())
        inputs = flatten(scheduled, self.table.block_size, self.device)
        with step_threads.for_step(self.device, self.dtype, len(inputs.input_ids)):
            return self._run(plan, inputs, lora, start)

    def _run(self, plan: StepPlan, inputs: StepInputs, lora: LoRAMapping | None, start: float) -> StepResult:
        """The step's forward, and on the last pipeline stage its sampling and result."""
        if self.stage is not None and not self.stage.last:
            return self._pass_on(plan, inputs, lora)
        states = inputs.sampling_requests
        try:
            return self._finish(plan, inputs, self._forward(plan.step_id, inputs, lora), start)
        except Exception:  # the earlier stages still wait for this step's outcome
            if self.stage is not None and states:
                self.stage.send_outcome(Outcome(plan.step_id, [], [], {s.req_id: "the step failed" for s in states}))
            raise

    def _finish(self, plan: StepPlan, inputs: StepInputs, hidden: torch.Tensor, start: float) -> StepResult:
        """Sample, advance the table and build the step's result (the last pipeline stage)."""
        states = inputs.sampling_requests
        logits = self.model.compute_logits(hidden[inputs.logits_indices]) if states else None
        self._sync()
        forward_done = time.perf_counter()
        with step_threads.for_sampling(len(logits) if states else 0):
            tokens, logprobs, stopped = self.outputs.sample(logits, states) if states else ([], [], [])
        prompt_logprobs = self.outputs.prompt_logprobs(hidden, inputs) if inputs.prompt_rows else {}
        pooled = self.pooler.pool(hidden, inputs.pooling_rows) if inputs.pooling_rows else {}
        failed = self.table.take_failed()
        kept = [i for i, s in enumerate(states) if s.req_id not in failed]
        drafts = self.proposer.propose(plan, self.table, {states[i].req_id for i in kept}, inputs, hidden)
        verified = self.proposer.verified([states[i] for i in kept])
        # one entry per token: a verification's accepted proposals, then its sampled token
        req_ids = [states[i].req_id for i in kept for _ in tokens[i]]
        tokens, logprobs = [t for i in kept for t in tokens[i]], [lp for i in kept for lp in logprobs[i]]
        self.table.advance(plan)
        if self.stage is not None and states:
            self.stage.send_outcome(Outcome(plan.step_id, req_ids, tokens, failed))
        self.last_stats = StepStats(
            _phase(inputs.attn.num_decodes, inputs.attn.num_reqs),
            inputs.attn.num_reqs,
            len(inputs.input_ids),
            forward_done - start,
            time.perf_counter() - forward_done,
        )
        return StepResult(
            plan.step_id, req_ids, tokens, logprobs, {r: lp for r, lp in prompt_logprobs.items() if r not in failed},
            failed, [r for r in stopped if r not in failed], pooled=pooled, draft_token_ids=drafts,
            num_proposed=verified,
        )

    def _pass_on(self, plan: StepPlan, inputs: StepInputs, lora: LoRAMapping | None = None) -> StepResult:
        """An earlier pipeline stage: send the activations on; the sampled tokens come later."""
        self.stage.expect(plan.step_id, [s.req_id for s in inputs.sampling_requests])
        try:
            out = self._forward(plan.step_id, inputs, lora)
        except Exception:  # the next stage waits for this step: it fails the step too
            self.stage.send_failure(plan.step_id)
            raise
        self.stage.send_activations(plan.step_id, out)
        self.table.advance(plan)
        return StepResult(plan.step_id, [], [], failed=self.table.take_failed())

    def _take_outcomes(self, plan: StepPlan) -> None:
        """An earlier stage: the tokens (and failures) of the steps whose requests ``plan`` touches.
        Its grammar matchers accept them as the last stage's did when it sampled them, so every
        stage cuts the engine's proposals alike (RequestTable._schedulable)."""
        for outcome in self.stage.outcomes_for(plan):
            known = [(r, t) for r, t in zip(outcome.req_ids, outcome.tokens) if r in self.table.states]
            for req_id, token in known:
                self.table.states[req_id].sampling.append(token)
            _, rejected = self.structured.accept([r for r, _ in known], [t for _, t in known])
            for req_id, message in rejected.items():  # the last stage accepted them: a broken matcher
                self.table.fail(req_id, message)
            for req_id in outcome.failed:
                self.table.dropped_as_failed(req_id)

    def _agree_on_refusals(self, plan: StepPlan) -> None:
        """Parallel ranks must run the same batch. Refusing a new request is the same decision
        on every rank, except a grammar's compile timeout (each rank measures its own time):
        with constraints among the new requests, a request any rank refused is refused on
        every rank."""
        if self.config.parallel.world_size == 1 or not any(
            n.sampling_params.structured_outputs for n in plan.new_requests
        ):
            return
        for refused in world_all_gather_object(self.table.failed):
            for req_id, message in refused.items():
                if req_id not in self.table.failed:
                    self.table.fail(req_id, message)

    def _forward(self, step_id: int, inputs: StepInputs, lora: LoRAMapping | None = None) -> torch.Tensor | Intermediate:
        """Hidden states of the step's tokens (an earlier pipeline stage's: what it hands the next):
        a decode graph's replay when one covers the step (graphs run the base model only: a step
        with adapters runs eagerly)."""
        if self.decode_graphs is not None and lora is None:
            hidden = self.decode_graphs.run(inputs)
            if hidden is not None:
                return hidden
        if self.encoder:
            segments = [state.pooling.segment_start for state, _, _ in inputs.pooling_rows]
            meta = EncoderMetadata.build(inputs.attn.query_start_loc, segments, self.device)
        else:
            meta = self.backend.build(inputs.attn)
        ctx = ForwardContext(self.backend, meta, self.kv_caches, lora)
        with set_forward_context(ctx):
            if self.stage is None or self.stage.first:
                return self.model(inputs.input_ids, inputs.positions)
            expected = Activations(step_id, len(inputs.input_ids), self.model.aux_layers_received())
            intermediate = self.stage.recv_activations(expected, self.config.model.hidden_size, self.dtype)
            return self.model(inputs.input_ids, inputs.positions, intermediate)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _phase(num_decodes: int, num_reqs: int) -> str:
    return "decode" if num_decodes == num_reqs else "prefill" if num_decodes == 0 else "mixed"
