"""allowed_token_ids, bad_words and truncate_prompt_tokens offline (vLLM's meaning): only the
allowed ids are sampled (greedy, random, n > 1); a bad word's token sequence never appears while
the rest of a greedy output is unchanged up to it; a truncated prompt gives what its last k tokens
give; hostile values are ValueError; both hold with speculative decoding and structured outputs."""

from __future__ import annotations

import msgspec
import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from services.worker.layers.sampler import SamplingState, process_logits
from services.worker.layers.sampling_metadata import SamplingMetadata

PROMPT = "Hello there, my friend"
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_dirs) -> LLM:
    return LLM(str(model_dirs("llama")))


def _tokens(llm: LLM, prompt, params: SamplingParams) -> list[list[int]]:
    return [c.token_ids for c in llm.generate(prompt, params, use_tqdm=False)[0].outputs]


def _contains(tokens: list[int], seq: list[int]) -> bool:
    return any(tokens[i : i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


@pytest.mark.parametrize("params", [
    GREEDY,
    msgspec.structs.replace(GREEDY, temperature=1.0, n=4),
    msgspec.structs.replace(GREEDY, temperature=1.0, n=3, seed=7, top_k=2),
])
def test_allowed_token_ids_are_all_that_is_sampled(llm, params):
    allowed = [5, 77, 300, 900]
    outs = _tokens(llm, PROMPT, msgspec.structs.replace(params, allowed_token_ids=allowed))
    assert len(outs) == params.n and all(len(t) == 20 for t in outs)
    assert {t for out in outs for t in out} <= set(allowed)
    if params.n > 1:
        assert len({t for out in outs for t in out}) > 1  # really sampled, not one forced token


def test_bad_words_ban_a_sequence_and_keep_the_rest(llm):
    plain = _tokens(llm, PROMPT, GREEDY)[0]
    tok = llm.get_tokenizer()
    # a two-token word of the greedy output, whose tokens the processor bans as they stand
    for j in range(len(plain) - 1):
        word = tok.decode(plain[j : j + 2])
        if word.strip() and plain[j : j + 2] in llm.processor.bad_words_token_ids([word]):
            break
    else:
        pytest.fail("no two-token word in the greedy output")
    seqs = llm.processor.bad_words_token_ids([word])
    banned = _tokens(llm, PROMPT, msgspec.structs.replace(GREEDY, bad_words=[word]))[0]
    assert not any(_contains(banned, s) for s in seqs)
    first = next(i for i in range(len(plain) - 1) if plain[i : i + 2] in seqs)
    assert banned[: first + 1] == plain[: first + 1] and banned[first + 1] != plain[first + 1]
    # a one-token word is never sampled
    one = next(t for t in plain if len(llm.processor.bad_words_token_ids([tok.decode([t])])[0]) == 1
               and tok.decode([t]).strip())
    word = tok.decode([one])
    out = _tokens(llm, PROMPT, msgspec.structs.replace(GREEDY, bad_words=[word]))[0]
    assert not any(s[0] in out for s in llm.processor.bad_words_token_ids([word]))
    assert out[: plain.index(one)] == plain[: plain.index(one)]


def test_bad_words_are_tokenized_as_vllm_does(llm):
    tok = llm.get_tokenizer()
    for word in ("hello", " world", "values6"):
        plain = tok.encode(word.lstrip(), add_special_tokens=False)
        spaced = tok.encode(" " + word.lstrip(), add_special_tokens=False)
        expect = [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
        assert llm.processor.bad_words_token_ids([word]) == expect


def test_bad_words_only_look_at_the_output():
    params = SamplingParams(bad_words_token_ids=[[3, 4], [5], [6, 7, 8]])
    state = SamplingState.create(params, [3, 6, 7], (0,))
    assert state.banned_by_bad_words() == [5]  # the prompt's 3 and 6 7 do not count
    for token in (3, 6, 7):
        state.append(token)
    assert state.banned_by_bad_words() == [5, 8]
    state.append(3)
    assert state.banned_by_bad_words() == [4, 5]


def test_masks_are_built_once_per_request():
    import torch

    state = SamplingState.create(SamplingParams(allowed_token_ids=[1, 3]), [2], (0,))
    meta = SamplingMetadata.build([state], 6, "cpu")
    mask = state.disallowed
    assert mask is not None and SamplingMetadata.build([state], 6, "cpu") and state.disallowed is mask
    out = process_logits(torch.zeros(1, 6), meta)
    assert out.isfinite().nonzero()[:, 1].tolist() == [1, 3]


@pytest.mark.parametrize("k", [1, 4, -1])
def test_truncate_prompt_tokens_keeps_the_last_tokens(llm, k):
    ids = llm.get_tokenizer().encode(PROMPT)
    kept = ids[-k:] if k > 0 else ids
    params = msgspec.structs.replace(GREEDY, truncate_prompt_tokens=k)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert out.prompt_token_ids == kept
    assert out.outputs[0].token_ids == _tokens(llm, {"prompt_token_ids": kept}, GREEDY)[0]
    chat = llm.chat([{"role": "user", "content": PROMPT}], params, use_tqdm=False)[0]
    full = llm.chat([{"role": "user", "content": PROMPT}], GREEDY, use_tqdm=False)[0].prompt_token_ids
    assert chat.prompt_token_ids == (full[-k:] if k > 0 else full)


@pytest.mark.parametrize(("fields", "match"), [
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, "2"]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1024]}, "allowed_token_ids: token id 1024 is out of range"),
    ({"allowed_token_ids": [1] * 1025}, "allowed_token_ids: 1025 token ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": ["w"] * 129}, "bad_words"),
    ({"bad_words": ["w" * 129]}, "bad_words"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 1025}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
])
def test_hostile_values_are_value_errors(llm, fields, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPT, SamplingParams(max_tokens=2, **fields), use_tqdm=False)
    assert _tokens(llm, PROMPT, GREEDY)  # and the engine serves on


def test_with_structured_outputs_both_masks_apply(llm):
    tok = llm.get_tokenizer()
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    regex = StructuredOutputsParams(regex="[0-9]{6}")
    params = SamplingParams(temperature=1.0, n=4, max_tokens=10, structured_outputs=regex,
                            allowed_token_ids=digits[:3] + [tok.eos_token_id])
    outs = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    assert all(len(o.text) == 6 and set(o.text) <= set("012") for o in outs), [o.text for o in outs]
    banned = SamplingParams(temperature=0, max_tokens=10, structured_outputs=regex, bad_words=["1", "2", "3"])
    text = llm.generate(PROMPT, banned, use_tqdm=False)[0].outputs[0].text
    assert len(text) == 6 and not set(text) & set("123")
    # nothing left to sample fails that request alone
    none = SamplingParams(max_tokens=4, structured_outputs=regex, allowed_token_ids=[tok.convert_tokens_to_ids("a")])
    bad, good = llm.generate([PROMPT, PROMPT], [none, GREEDY], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and len(good.outputs[0].token_ids) == 20


def test_speculative_decoding_keeps_the_masks(model_dirs):
    path = str(model_dirs("llama", attention_scale=0.005))
    llms = [LLM(path, max_model_len=160, kv_cache_memory=8 << 20, speculative_config=c)
            for c in (None, {"method": "ngram", "num_speculative_tokens": 4})]
    prompt = "the cat sat on the mat, the cat sat on the mat"
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(llms[0], prompt, params)[0]
    allowed = sorted(set(plain))[:-1]  # the output's tokens but one
    word = llms[0].get_tokenizer().decode(plain[2:4])
    for extra in ({"allowed_token_ids": allowed}, {"bad_words": [word]}):
        p = msgspec.structs.replace(params, **extra)
        want, got = (_tokens(llm, prompt, p)[0] for llm in llms)
        assert got == want and want != plain
        if "allowed_token_ids" in extra:
            assert set(got) <= set(allowed)
        else:
            assert not any(_contains(got, s) for s in llms[0].processor.bad_words_token_ids([word]))
    assert llms[1].engine.scheduler.spec.num_accepted_tokens > 0
    rand = SamplingParams(temperature=1.0, n=3, max_tokens=30, ignore_eos=True, allowed_token_ids=allowed)
    assert {t for out in _tokens(llms[1], prompt, rand) for t in out} <= set(allowed)


def test_async_scheduling_gives_the_same_masked_outputs(llm, model_dirs):
    other = LLM(str(model_dirs("llama")), async_scheduling=True)
    plain = _tokens(llm, PROMPT, GREEDY)[0]
    word = llm.get_tokenizer().decode(plain[3:5])
    for extra in ({"bad_words": [word]}, {"allowed_token_ids": sorted(set(plain))[1:]},
                  {"truncate_prompt_tokens": 3, "seed": 5, "temperature": 1.0, "n": 2}):
        p = msgspec.structs.replace(GREEDY, **extra)
        assert _tokens(other, PROMPT, p) == _tokens(llm, PROMPT, p)
