"""The byte bound that lets a frontend refuse an over-long text before tokenizing it: a text of
B bytes has at least B / max_token_bytes tokens, for the tokenizers the tests build; a tokenizer
that drops input (whitespace-splitting WordPiece) gets no bound at all."""

from __future__ import annotations

import random
from pathlib import Path

from shared.processor.tokenizer import load_tokenizer, max_token_bytes


def lossy_tokenizer_dir(out: Path) -> Path:
    """A BERT-style tokenizer: lowercases, strips accents and splits on whitespace, dropping it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20,
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return out


def _texts(tokenizer) -> list[str]:
    vocab = sorted(tokenizer.get_vocab(), key=lambda t: len(t.encode()), reverse=True)
    longest = [tokenizer.convert_tokens_to_string([t]) for t in vocab[:20]]
    rng = random.Random(0)
    chars = [chr(c) for c in (*range(32, 127), *range(0xC0, 0x250), *range(0x3040, 0x30FF), 0x1F642, 0x1F680)]
    return [
        *(t * 300 for t in longest if t),  # the longest tokens back to back: the bound's worst case
        " " * 5000, "\n" * 5000, "a" * 5000, "ab" * 2500, "🙂" * 2000,
        "".join(rng.choice(chars) for _ in range(5000)),
        " ".join(rng.choice(["hello", "world", "the", "fox", "日本語"]) for _ in range(2000)),
    ]


def test_no_text_has_fewer_tokens_than_the_bound(model_path, tokenizer_dir):
    for path in (model_path, tokenizer_dir):
        tokenizer = load_tokenizer(str(path))
        bound = max_token_bytes(tokenizer)
        assert bound is not None and bound >= 1
        for text in _texts(tokenizer):
            n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            assert n_tokens * bound >= len(text.encode()), (path, text[:40], n_tokens, bound)


def test_a_tokenizer_that_drops_input_gets_no_bound(tmp_path):
    tokenizer = load_tokenizer(str(lossy_tokenizer_dir(tmp_path)))
    assert len(tokenizer.encode(" " * 5000 + "hello", add_special_tokens=False)) == 1  # spaces gone
    assert max_token_bytes(tokenizer) is None
