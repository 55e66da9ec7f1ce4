"""An EAGLE draft head (speculative_config method "eagle" or "eagle3") run by the worker after each
step, on the draft model's machinery (draft_runner.py): its own paged KV cache under the target's
block ids plus scratch blocks, drafting with each request's sampling parameters, the drafts'
q kept for rejection sampling, with async scheduling too (proposals.py). What it can run on is in
shared/eagle.py (a Llama-family target; an EAGLE-3 target's decode steps run without CUDA graphs,
which do not keep the aux states; the one-call CPU decode step keeps them). Under tensor
parallelism the head runs whole on each rank (its KV too), borrowing the target's sharded embedding
and LM head (whose collectives every rank calls alike, as every rank drafts alike from the same
tokens; see draft_runner.py on ranks drawing the same drafts). Under pipeline parallelism the head
runs on the last stage, which samples and holds the final hidden states, and its drafts go back to
the engine as a draft model's do; the token embedding lives on the first stage, so the last stage
embeds with a tied target's LM head or loads a whole copy of the target's embedding
(stage_embedding). An EAGLE-3 head's aux layers may lie on any stage: each stage keeps the states
entering its own and sends them on with its activations (pipeline.py), so the last stage has all.

A head's position p reads token p + 1 and the target's hidden state of position p (EAGLE-1: the
last layer's after the final norm; EAGLE-3: the three aux layers' inputs, through fc). The target's
hidden states exist only in the step that computed them, so after every step the worker keeps, per
request, the states of the step's positions whose next token is known (a prefill chunk's, and a
verification's up to its last accepted token; not a rejected proposal's). The head runs over a
request's kept positions when the plan next asks it for drafts (its KV then follows the target's;
leaving them out instead cut a test's acceptance from 76% to 13%), or with every request's kept
positions once they would pass the step's token budget, in one forward. So a step that drafts
nothing runs no head (running it every step cost 5-9% of plain decoding where the adaptive rule
drafts nothing), and a request that drafts after a gap catches up in one forward, as a draft
model's does. The drafting requests draft: the first from the head's output at their last
position, each next one from the draft just made with the head's own output state fed back (as
vLLM does). Positions past a request's blocks go to scratch blocks and are computed again next
step. A prefix-cache hit's tokens are not computed by the target, nor by the head: their head KV
is the one written by the request that computed them (the same tokens, but at a block's last
position the next token may differ), which costs acceptance, never correctness.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from services.worker.distributed import whole_model
from services.worker.draft_runner import DraftRunner, _drafting, _Row
from services.worker.input_batch import StepInputs
from services.worker.layers.attention_backend import AttentionBackend
from services.worker.layers.embedding import VocabParallelEmbedding
from services.worker.loader import building, checkpoint_tensor, checkpoint_tensor_names, load_weights
from services.worker.models.eagle import Eagle3Head, EagleHead
from services.worker.pipeline import MissingLayer
from services.worker.request_table import RequestState, RequestTable
from shared.config import EngineConfig, ModelConfig
from shared.draft_model import draft_model_config
from shared.eagle import EAGLE_METHODS, aux_layer_ids
from shared.protocol import StepPlan

log = logging.getLogger(__name__)


def create_drafter(config: EngineConfig, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
                   target: nn.Module) -> DraftRunner | None:
    """The runner of the model that drafts on this rank: an EAGLE head's, a draft model's
    (DraftRunner.create), or None."""
    spec, p = config.speculative, config.parallel
    if spec is not None and spec.method == "eagle3":  # every stage keeps the states entering its aux layers
        target.set_aux_hidden_layers(aux_layer_ids(draft_model_config(config).hf_config, config.model.num_layers))
    if spec is not None and spec.method in EAGLE_METHODS:  # on the last pipeline stage, which samples
        return EagleRunner(config, dtype, device, backend, target) if p.pp_rank == p.pipeline_parallel_size - 1 else None
    return DraftRunner.create(config, dtype, device, backend)


@dataclasses.dataclass
class _Kept:
    """A request's positions [start, end) that the head has yet to run over, and their input states."""

    state: RequestState
    start: int
    end: int
    states: list[torch.Tensor]


class EagleRunner(DraftRunner):
    """Loads an EAGLE head beside the target and drafts with it after each step (see the module)."""

    shift = 1

    def __init__(self, config: EngineConfig, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
                 target: nn.Module):
        head_config = draft_model_config(config)
        # whole on every tensor-parallel rank (its KV too): the ranks compute the same drafts
        parallel = dataclasses.replace(config.parallel, tensor_parallel_size=1, rank=0, pipeline_parallel_size=1)
        self._setup(config, head_config, parallel, dtype, device, backend)
        self.target = target
        with whole_model(sharded=False):
            self.model = build_head(head_config, config.speculative.method, target, dtype, device)
            if self.model.borrows_embedding() and isinstance(target.model.embed_tokens, MissingLayer):
                self.model.embed_with(stage_embedding(config, target, dtype, device))
        self.kept: dict[str, _Kept] = {}  # per request, the target states the head has yet to run over
        log.info("%s head %s: %d tokens drafted per step", config.speculative.method, head_config.path, self.k)

    def _propose(self, plan: StepPlan, table: RequestTable, samplers: set[str], inputs: StepInputs,
                 hidden: torch.Tensor) -> dict[str, np.ndarray]:
        rows, index = self._step_rows(plan, table, samplers, inputs)
        if not rows:
            return {}
        if isinstance(self.model, Eagle3Head):  # the aux layers' states, in aux_layer_ids' order (create_drafter)
            hidden = torch.cat(self.target.model.aux_hidden, dim=-1)
        rows, states = self._due(rows, self.model.combine(hidden[index]))
        if not rows:
            return {}
        out, fed = self._forward(rows, [(r.start, r.end) for r in rows], states)
        last = np.cumsum([r.end - r.start for r in rows]) - 1
        drafting = [i for i, r in enumerate(rows) if r.room > 0]
        if not drafting:
            return {}
        at = torch.as_tensor(last[drafting], device=self.device)
        live, out, fed = [rows[i] for i in drafting], out[at], fed[at]
        while True:
            self._draft(live, self.model.compute_logits(out))
            kept = [i for i, r in enumerate(live) if r.room > 0]
            if not kept:
                break
            live = [live[i] for i in kept]  # each row's latest draft, read at the position before it
            spans = [(r.end + len(r.drafts) - 1, r.end + len(r.drafts)) for r in live]
            out, fed = self._forward(live, spans, fed[torch.as_tensor(kept, device=self.device)])
        return self._proposals([rows[i] for i in drafting])

    def release(self, req_id: str) -> None:
        self.kept.pop(req_id, None)

    def reset(self) -> None:
        self.kept.clear()

    def _due(self, rows: list[_Row], states: torch.Tensor) -> tuple[list[_Row], torch.Tensor]:
        """The rows the head runs over now, each from its first kept position, and their input
        states laid out as their spans. A row that drafts nothing is kept for later, unless the
        step's kept positions would then pass its token budget: then they all run now."""
        due, later = [], []
        for row, piece in zip(rows, torch.split(states, [r.end - r.start for r in rows])):
            kept = self.kept.pop(row.state.req_id, None)
            if kept is None or kept.state is not row.state or kept.end != row.start:  # resent: start again
                kept = _Kept(row.state, row.start, row.start, [])
            kept.states.append(piece)
            kept.end, row.start = row.end, kept.start
            (due if row.room > 0 else later).append((row, kept))
        if sum(k.end - k.start for _, k in later) > self.config.scheduler.max_num_batched_tokens:
            due, later = due + later, []
        for row, kept in later:
            kept.states[-1] = kept.states[-1].clone()  # a view would keep the whole step's states alive
            self.kept[row.state.req_id] = kept
        if not due:
            return [], states
        return [r for r, _ in due], torch.cat([s for _, k in due for s in k.states])

    def _step_rows(self, plan: StepPlan, table: RequestTable, samplers: set[str],
                   inputs: StepInputs) -> tuple[list[_Row], torch.Tensor]:
        """One row per request of the step still in the table: the positions the target computed
        whose next token is known, from `start` to `end` (exclusive); room for drafts if the plan
        asks some of it. And where their target hidden states are among the step's rows."""
        rows, index = [], []
        max_len = self.config.model.max_model_len
        first = inputs.attn.query_start_loc
        for i, state in enumerate(inputs.requests):
            if table.states.get(state.req_id) is not state or state.req_id in table.failed:
                continue
            start = state.num_computed_tokens  # the table has not advanced yet
            end = min(start + first[i + 1] - first[i], state.num_tokens - 1)
            if end <= start:
                continue
            room = 0
            if state.req_id in samplers and end == state.num_tokens - 1:
                room = min(plan.num_draft_tokens.get(state.req_id, 0), self.k, max_len - state.num_tokens)
            sampling = _drafting(state.sampling) if room > 0 else state.sampling
            rows.append(_Row(state, start, end, state.block_ids + self._scratch(len(rows)), sampling, max(room, 0)))
            index.extend(range(first[i], first[i] + end - start))
        return rows, torch.as_tensor(index, dtype=torch.long, device=self.device)


def stage_embedding(config: EngineConfig, target: nn.Module, dtype: torch.dtype,
                    device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The target's token embedding on a last pipeline stage that does not hold it (the first
    does): a tied target's LM head (the same weight), else a whole copy of the checkpoint's."""
    if getattr(target, "tie_word_embeddings", False):
        return functools.partial(VocabParallelEmbedding.forward, target.lm_head)
    m = config.model
    with building(dtype, device):
        embedding = VocabParallelEmbedding(m.vocab_size, m.hidden_size)
    embedding.weight_loader(embedding.weight, checkpoint_tensor(m.path, "model.embed_tokens.weight"))
    return embedding.requires_grad_(False)


def build_head(config: ModelConfig, method: str, target: nn.Module, dtype: torch.dtype,
               device: torch.device) -> EagleHead | Eagle3Head:
    """The head at config.path, its weights loaded; ValueError for a checkpoint that is not one."""
    names = checkpoint_tensor_names(config.path)
    if "fc.weight" not in names:
        raise ValueError(f"the {method} head {config.path} has no fc.weight: not an EAGLE checkpoint")
    own_embedding = "embed_tokens.weight" in names
    with building(dtype, device):
        if method == "eagle3":
            width = config.hf_config.get("target_hidden_size") or config.hidden_size
            head = Eagle3Head(config, target, own_embedding, width)
        else:
            head = EagleHead(config, target, own_embedding, "fc.bias" in names,
                             "layers.0.input_layernorm.weight" in names)
    try:
        load_weights(head, config.path)
    except ValueError as exc:
        raise ValueError(f"the {method} head {config.path}: {exc}") from None
    if isinstance(head, Eagle3Head):
        ids = torch.arange(head.d2t.numel(), device=head.d2t.device) + head.d2t
        if ids.min() < 0 or ids.max() >= config.vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"the eagle3 head {config.path}: d2t must map each draft token to its own target token")
    return head.requires_grad_(False).eval()
