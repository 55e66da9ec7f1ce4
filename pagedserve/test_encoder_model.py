"""Seeded random-weight encoder checkpoints (BERT, XLM-RoBERTa, a BERT cross-encoder, a BERT
three-label classifier), for tests without downloads: config.json and safetensors saved by
transformers itself, and a WordPiece
tokenizer trained on local text (the standard library's source) whose post-processor adds
[CLS]/[SEP] and token types for pairs, as BERT's does."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pagedserve.test_model import _corpus, _save_quietly

ENCODER_ARCHS = ("bert", "xlm-roberta", "bert-cross-encoder", "bert-classifier")
CLASSIFIER_LABELS = ("negative", "neutral", "positive")
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_VOCAB = 1024


def make_encoder_model(out_dir: str | Path, arch: str = "bert", seed: int = 0, max_position: int = 512) -> Path:
    """Write a tiny random-weight checkpoint of arch (one of ENCODER_ARCHS) into out_dir."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    if arch not in ENCODER_ARCHS:
        raise ValueError(f"arch must be one of {ENCODER_ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(out, max_position)
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "hidden_act": "gelu"}
    if arch == "xlm-roberta":  # positions start after the padding id ([PAD], 0): one more row
        config = XLMRobertaConfig(**shape, max_position_embeddings=max_position + 1, pad_token_id=0, type_vocab_size=1)
        cls = XLMRobertaModel
    else:
        labels = {"id2label": dict(enumerate(CLASSIFIER_LABELS))} if arch == "bert-classifier" else {"num_labels": 1}
        config = BertConfig(**shape, max_position_embeddings=max_position, pad_token_id=0, **labels)
        cls = BertModel if arch == "bert" else BertForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
        for name, param in model.named_parameters():  # LayerNorms and biases away from 1 and 0
            if param.ndim == 1:
                param.data.add_(torch.randn_like(param) * 0.1)
        if cls is BertForSequenceClassification:  # the init's 0.02 head gives every input the same scores to ~1e-5
            # the classifier's pooler kept out of tanh's saturation: its probabilities stay well inside (0, 1)
            model.bert.pooler.dense.weight.data.normal_(0.0, 0.5 if arch == "bert-cross-encoder" else 0.05)
            model.classifier.weight.data.normal_(0.0, 1.0)
    _save_quietly(model, out, None)
    return out


def _save_tokenizer(out: Path, max_length: int):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_wordpiece_json()),
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(out)
    return tokenizer


@functools.cache
def _wordpiece_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=_VOCAB, special_tokens=_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(_corpus()[:20], trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return json.dumps(json.loads(tokenizer.to_str()))
