"""Hugging Face `tokenizers` built from the same vocabulary and merges: the parity oracle.

It gets each model family's original pre-tokenizer (not the one that
`transformers`' GGUF conversion guesses), so it gives the ids the model was
trained with.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ringlm.ext import _bpe
from ringlm.ext.tokenizer_files import LLAMA3_PATTERN, QWEN2_PATTERN, TokenizerSpec


def hf_pre_tokenizer(rule: int):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if rule == _bpe.SPLIT_GPT2:
        return byte_level
    if rule == _bpe.SPLIT_SMOLLM:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    pattern = {_bpe.SPLIT_LLAMA3: LLAMA3_PATTERN, _bpe.SPLIT_QWEN2: QWEN2_PATTERN}[rule]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def hf_tokenizer(spec: TokenizerSpec, rule: int | None = None) -> HFTokenizer:
    """An HF tokenizer with spec's vocabulary and merges and the split rule `rule`."""
    vocab = {token: i for i, token in enumerate(spec.tokens)}
    tokenizer = HFTokenizer(models.BPE(vocab, list(spec.merges), ignore_merges=spec.ignore_merges))
    tokenizer.pre_tokenizer = hf_pre_tokenizer(spec.split_rule if rule is None else rule)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                                  for i in spec.special_ids])
    tokenizer.add_tokens([AddedToken(spec.tokens[i], special=False, normalized=False)
                          for i in spec.added_ids])
    return tokenizer

