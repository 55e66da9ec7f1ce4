"""What a step's hidden states become on the rank that samples (the last pipeline stage): each
sampling request's tokens (a verification's several, position by position), their logprobs and
the requests whose grammar ended with them; and the prompt logprobs of the prompt rows. A request
that fails here (its grammar, nothing left to sample, its prompt logprobs) fails alone, in the
request table."""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from services.worker.draft_runner import DraftRunner
from services.worker.input_batch import StepInputs
from services.worker.layers.sampler import NO_TOKEN, Sampler, SamplingMetadata
from services.worker.request_table import RequestState, RequestTable
from services.worker.structured_output import StructuredOutputs
from shared.protocol import TokenLogprobs

log = logging.getLogger(__name__)

NO_TOKEN_MESSAGE = (
    "no token can be sampled: every token is masked or a logit is not a finite number "
    "(check allowed_token_ids, bad_words, logit_bias, the penalties, min_tokens and structured_outputs)"
)


class StepOutputs:
    """Samples a step's logits and scores its prompt rows (see the module)."""

    def __init__(self, model: nn.Module, table: RequestTable, structured: StructuredOutputs,
                 draft: DraftRunner | None, device: torch.device):
        self.model, self.table, self.structured, self.draft, self.device = model, table, structured, draft, device
        self.sampler = Sampler()

    def sample(
        self, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[list[list[int]], list[list[TokenLogprobs | None]], list[str]]:
        """Each request's tokens and logprobs, appended to its state, and the requests whose
        grammar ended. Position by position: a request verifying proposed tokens samples its row
        j after the tokens before it were appended (penalties, min_tokens, seeds and its grammar
        see them), and goes on to row j + 1 only while its sampled tokens equal the proposals.
        For a point-mass proposal that is rejection sampling: every token keeps the target's
        distribution. Failed requests (grammar, nothing to sample) are failed in the table."""
        first_rows = list(itertools.accumulate((1 + len(s.spec_token_ids) for s in states), initial=0))
        tokens: list[list[int]] = [[] for _ in states]
        logprobs: list[list[TokenLogprobs | None]] = [[] for _ in states]
        stopped: list[str] = []
        live, j = list(range(len(states))), 0
        while live:
            rows = logits if len(live) == logits.shape[0] else logits[[first_rows[i] + j for i in live]]
            sampled, lps, ended = self._sample_rows(rows, [states[i] for i in live], j)
            stopped += ended
            verifying = []
            for i, token, lp in zip(live, sampled, lps):
                state = states[i]
                if state.req_id in self.table.failed:
                    continue
                state.sampling.append(token)
                tokens[i].append(token)
                logprobs[i].append(lp)
                if j < len(state.spec_token_ids) and token == state.spec_token_ids[j] and state.req_id not in ended:
                    verifying.append(i)
            live, j = verifying, j + 1
        return tokens, logprobs, stopped

    def _sample_rows(
        self, logits: torch.Tensor, states: list[RequestState], j: int = 0
    ) -> tuple[list[int], list[TokenLogprobs | None], list[str]]:
        """Tokens and logprobs of every row (at verification position j), and the requests whose
        grammar ended with their token. Rows that fail (their grammar, or nothing left to sample)
        are failed in the table. A draft model's proposals are rejection-sampled (rejection_sampler.py)."""
        for req_id, message in self.structured.apply(logits, [s.req_id for s in states]).items():
            self.table.fail(req_id, message)
        meta = SamplingMetadata.build([s.sampling for s in states], logits.shape[-1], self.device)
        chosen = self.draft.distributions.choose(logits, meta, states, j) if self.draft else None
        out = self.sampler(logits, meta, chosen)
        tokens = out.sampled_token_ids.tolist()
        for state, token in zip(states, tokens):
            if token == NO_TOKEN:
                self.table.fail(state.req_id, NO_TOKEN_MESSAGE)
        live = [i for i, s in enumerate(states) if s.req_id not in self.table.failed]
        stopped, rejected = self.structured.accept([states[i].req_id for i in live], [tokens[i] for i in live])
        for req_id, message in rejected.items():
            self.table.fail(req_id, message)
        return tokens, _logprob_lists(out, states), stopped

    def prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> dict[str, list[TokenLogprobs]]:
        """Log-softmax of the raw logits at each scored prompt position: the next prompt token's
        logprob and rank, then the top prompt_logprobs tokens."""
        result = {}
        for state, row, pos, count in inputs.prompt_rows:
            try:
                result[state.req_id] = self._score_prompt(hidden[row : row + count], state, pos, count)
            except Exception as exc:  # this request's alone
                log.exception("prompt logprobs of request %s failed", state.req_id)
                self.table.fail(state.req_id, f"prompt_logprobs failed: {type(exc).__name__}: {exc}")
        return result

    def _score_prompt(self, hidden: torch.Tensor, state: RequestState, pos: int, count: int) -> list[TokenLogprobs]:
        logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        targets = torch.tensor(state.token_ids[pos + 1 : pos + 1 + count], device=logprobs.device)
        target_lp = logprobs.gather(1, targets[:, None])
        ranks = (logprobs > target_lp).sum(dim=-1) + 1
        top_lp, top_ids = logprobs.topk(state.sampling.params.prompt_logprobs, dim=-1)
        ids = torch.cat([targets[:, None], top_ids], dim=1).tolist()
        vals = torch.cat([target_lp, top_lp], dim=1).tolist()
        return [TokenLogprobs(i, v, r) for i, v, r in zip(ids, vals, ranks.tolist())]


def _logprob_lists(out, states) -> list[TokenLogprobs | None]:
    if out.logprobs is None:
        return [None] * len(states)
    ids, vals, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.sampled_ranks.tolist()
    result: list[TokenLogprobs | None] = []
    for i, state in enumerate(states):
        k = state.sampling.params.logprobs
        result.append(None if k is None else TokenLogprobs(ids[i][: k + 1], vals[i][: k + 1], ranks[i]))
    return result
