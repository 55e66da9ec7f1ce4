"""Suffix decoding's tree and proposer, torch-free: the tree's counts equal a brute-force count
of every substring while sequences grow token by token and are evicted; exact proposals on
hand-built sequences; per-request trees freed when requests finish or abort, and the global tree
bounded by suffix_decoding_max_cached_requests after many requests."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.engine.request import Request
from services.engine.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.proposers.suffix import SuffixProposer
from shared.proposers.suffix_tree import SuffixTree
from shared.protocol import StepResult
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig


def brute_counts(seqs: list[list[int]], depth: int) -> Counter:
    return Counter(tuple(s[i : i + n]) for s in seqs for i in range(len(s)) for n in range(1, depth + 1)
                   if i + n <= len(s))


def tree_count(tree: SuffixTree, string: tuple[int, ...]) -> int:
    found = tree.locate(list(string))
    if found is None:
        return 0
    node, extra = found
    return 1 if extra else tree.count[node]


def assert_counts(tree: SuffixTree, seqs: list[list[int]]) -> None:
    expected = brute_counts(seqs, tree.max_depth)
    for string, count in expected.items():
        assert tree_count(tree, string) == count, string
    rng = random.Random(0)
    for _ in range(50):  # strings that never occur are not found
        string = tuple(rng.randrange(4) for _ in range(rng.randrange(1, tree.max_depth + 1)))
        assert tree_count(tree, string) == expected.get(string, 0)


def test_tree_counts_every_substring_as_sequences_grow_and_go():
    rng = random.Random(1)
    tree = SuffixTree(max_depth=5)
    seqs = {i: [] for i in range(4)}
    for _ in range(40):  # grow the sequences interleaved, a few tokens at a time
        for i, seq in seqs.items():
            seq.extend(rng.randrange(4) for _ in range(rng.randrange(3)))
            tree.extend(i, seq)
    assert_counts(tree, list(seqs.values()))
    for i in (2, 0):
        tree.finish(i)
        tree.remove(i)
        del seqs[i]
        assert_counts(tree, list(seqs.values()))
    tree.remove(1)
    tree.remove(3)
    assert tree.num_nodes == 1 and tree.count[0] == 0  # only the root: nothing left behind


def test_repeats_cost_nodes_a_sequence_without_them_does_not():
    tree = SuffixTree(max_depth=24)
    tree.extend(0, list(range(1000)))
    assert tree.num_nodes == 1001  # one frontier node per start, not one per (start, depth)
    looping = SuffixTree(max_depth=24)
    looping.extend(0, [1, 2, 3] * 300)
    assert looping.num_nodes < 3 * 24 + 10  # a loop has few distinct substrings


def test_continuation_takes_the_most_frequent_path_while_likely_enough():
    tree = SuffixTree(max_depth=4)
    tree.extend(0, [1, 2, 3, 1, 2, 4, 1, 2, 3])
    node, extra = tree.locate([1, 2])
    # after [1, 2]: 3 twice, 4 once; after [1, 2, 3]: 1 once (the other [1, 2, 3] ends the sequence);
    # [1, 2, 3, 1] is max_depth long
    assert tree.continuation(node, extra, 5, 0.1) == ([3, 1], pytest.approx(4 / 3))
    assert tree.continuation(node, extra, 5, 0.7) == ([], 0.0)
    assert tree.continuation(node, extra, 1, 0.1)[0] == [3]
    assert tree.continuation(*tree.locate([4]), 5, 0.1)[0] == [1, 2, 3]  # one occurrence, followed to the end


def suffix_config(**kw) -> SpeculativeConfig:
    return SpeculativeConfig.parse({"method": "suffix", **kw})


def request(req_id: str, tokens: list[int], num_prompt: int | None = None) -> Request:
    prompt = tokens[:num_prompt] if num_prompt else tokens
    output = tokens[len(prompt):]
    return Request(req_id, prompt, SamplingParams(max_tokens=100), (0,), 512, output_token_ids=output)


def test_proposals_follow_the_longest_earlier_match_scaled_by_its_length():
    tokens = [5, 6, 7, 8, 9, 5, 6, 7]
    assert SuffixProposer(suffix_config()).propose_for(request("a", tokens), 4) == [8, 9, 5]  # 3 matched
    assert SuffixProposer(suffix_config(suffix_decoding_max_spec_factor=2)).propose_for(request("a", tokens), 4) == [
        8, 9, 5, 6]
    # 4 deep: [5, 6, 7] leaves room for 1 token, [6, 7] for 2, which wins
    assert SuffixProposer(suffix_config(suffix_decoding_max_tree_depth=4)).propose_for(request("a", tokens), 4) == [8, 9]
    split = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2]  # three continuations, a third each
    assert SuffixProposer(suffix_config()).propose_for(request("b", split), 4) == [3, 1]  # 2 matched
    assert SuffixProposer(suffix_config(suffix_decoding_min_token_prob=0.5)).propose_for(request("b", split), 4) == []
    assert SuffixProposer(suffix_config()).propose_for(request("c", [1, 2, 3, 4]), 4) == []


def test_a_request_grows_its_tree_and_learns_from_finished_outputs():
    proposer = SuffixProposer(suffix_config(suffix_decoding_max_cached_requests=2))
    done = request("done", [1, 10, 11, 12, 13, 14], num_prompt=1)
    proposer.propose_for(done, 4)
    assert "done" in proposer.trees
    proposer.release(done)
    assert "done" not in proposer.trees
    live = request("live", [50, 51, 52, 10, 11])
    assert proposer.propose_for(live, 4) == [12, 13]  # from the finished output, 2 tokens matched
    live.append_token(12)
    assert proposer.propose_for(live, 4) == [13, 14]
    for i in range(2):  # two more outputs evict the first
        proposer.release(request(f"other{i}", [1, 30 + i, 31 + i], num_prompt=1))
    assert proposer.propose_for(request("late", [10, 11]), 4) == []


def test_resumed_request_starts_a_new_tree():
    proposer = SuffixProposer(suffix_config())
    assert proposer.propose_for(request("r", [7, 8, 9, 7, 8]), 4) == [9, 7]
    assert proposer.propose_for(request("r", [1, 2, 3, 1]), 4) == [2]  # the same id, a new request


def test_state_is_freed_on_finish_and_abort_and_the_global_tree_stays_bounded():
    config = suffix_config(num_speculative_tokens=4, suffix_decoding_max_cached_requests=4)
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 64, speculative=config)
    proposer = scheduler.spec.proposer
    outputs = []
    for i in range(40):
        req_id = f"r{i}"
        scheduler.add_request(Request(req_id, [5, 6, 7, i] * 3, SamplingParams(max_tokens=3), (0,), 64))
        plan = scheduler.schedule()
        scheduler.update(plan, StepResult(plan.step_id, [req_id], [5]))
        plan = scheduler.schedule()
        proposed = plan.spec_token_ids[req_id].tolist()
        assert proposed == [6] and req_id in proposer.trees  # what followed [.., i, 5]; max_tokens leaves 1
        if i % 2:
            scheduler.abort([req_id])
            outputs.append([5])
        else:
            scheduler.update(plan, StepResult(plan.step_id, [req_id] * 2, [6, 9], num_proposed={req_id: 1}))
            outputs.append([5, 6, 9])
        assert scheduler.kv.pool.num_free_blocks == 64
    assert proposer.trees == {} and list(proposer.cached) == [36, 37, 38, 39]
    fresh = SuffixTree(proposer.max_depth)
    for j, out in enumerate(outputs[-4:]):
        fresh.extend(j, out)
    assert proposer.global_tree.num_nodes == fresh.num_nodes  # evicted outputs left nothing behind


def test_the_global_tree_keeps_within_its_node_budget():
    proposer = SuffixProposer(suffix_config(), max_global_nodes=100)
    for i in range(30):  # 30 outputs of 20 tokens seen nowhere else: 20 nodes each
        proposer.release(request(f"r{i}", [0] + list(range(100 + 20 * i, 120 + 20 * i)), num_prompt=1))
        assert proposer.global_tree.num_nodes <= 100
    assert list(proposer.cached) == [26, 27, 28, 29]  # a fifth would take 101 nodes


def test_suffix_config_is_checked_like_vllms():
    config = SpeculativeConfig.parse('{"method": "suffix"}')
    assert (config.num_speculative_tokens, config.suffix_decoding_max_tree_depth) == (24, 24)
    assert config.suffix_decoding_max_cached_requests == 10000 and config.suffix_decoding_min_token_prob == 0.1
    assert suffix_config(suffix_decoding_max_tree_depth=8).num_speculative_tokens == 8
    assert suffix_config(suffix_decoding_max_cached_requests=0).suffix_decoding_max_cached_requests == 0
    for bad, match in (
        ({"suffix_decoding_max_tree_depth": 0}, "max_tree_depth must be an integer"),
        ({"suffix_decoding_max_tree_depth": "8"}, "max_tree_depth must be an integer"),
        ({"suffix_decoding_max_cached_requests": -1}, "non-negative integer"),
        ({"suffix_decoding_max_spec_factor": -0.5}, "max_spec_factor must be a number"),
        ({"suffix_decoding_min_token_prob": 1.5}, "min_token_prob must be a number"),
        ({"suffix_decoding_min_token_prob": float("nan")}, "min_token_prob must be a number"),
        ({"suffix_decoding_max_depth": 3}, "unsupported key"),
    ):
        with pytest.raises(ValueError, match=match):
            suffix_config(**bad)
