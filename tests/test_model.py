"""The Llama decoder and its KV cache: parity with transformers, packed batches, cache behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from ringlm.server.model.kv_cache import KVCache
from ringlm.server.model.llama import Llama, ModelConfig, PackedBatch, SequenceChunk
from ringlm.server.model.threads import apply_torch_threads, default_torch_threads
from ringlm.server.model.weights import load_model

# Token ids of the default model's vocabulary, from its own tokenizer.
CHAT_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
PLAIN_PROMPT = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 975]
CODE_PROMPT = [1604, 3987, 46477, 24, 94, 727, 2367]

TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
HF_CASES = {
    "llama-untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=50000.0)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", dict(rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "linear-rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
}


def random_tokens(count: int, seed: int = 0, vocab: int = 128) -> list[int]:
    return torch.randint(vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_chunks(model: Llama, cache: KVCache, slot: int, tokens: list[int],
               sizes: list[int]) -> torch.Tensor:
    """Feed `tokens` to one slot in chunks of `sizes`; the last token's logits after each [chunks, vocab]."""
    assert sum(sizes) == len(tokens)
    logits, position = [], 0
    for size in sizes:
        chunk = SequenceChunk(slot, tokens[position:position + size], position)
        logits.append(model(PackedBatch.pack([chunk]), cache)[0])
        position += size
    return torch.stack(logits)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Replace transformers' init (unit norms, zero biases) so every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


@pytest.mark.parametrize("case", HF_CASES)
def test_tiny_model_matches_transformers(case, tmp_path):
    import transformers
    config_class, options = HF_CASES[case]
    config = getattr(transformers, config_class)(**TINY_HF, **options)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(reference, seed=1)
    reference.save_pretrained(tmp_path)
    tokens = random_tokens(48)
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]           # [48, vocab]

    model = load_model(tmp_path, device="cpu", dtype=torch.float32)
    # A 40-token prefill, then decode steps: logits for positions 39..47.
    logits = run_chunks(model, KVCache(model.config, 1, 64), 0, tokens, [40] + [1] * 8)
    assert_close(logits, expected[39:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("batched_decode_max_context", [0, 10, 1 << 20],
                         ids=["decode-per-sequence", "decode-mixed", "decode-batched"])
def test_packed_batch_matches_each_sequence_alone(tiny_model, batched_decode_max_context):
    config = tiny_model.config
    prompts = [random_tokens(n, seed=n) for n in (9, 5, 3, 12, 30)]
    alone = torch.stack([run_chunks(tiny_model, KVCache(config, 1, 64), 0, p, [len(p)])[0]
                         for p in prompts])
    # An earlier step leaves the sequences in different states; the next step then mixes
    # decodes (contexts 9, 3, 30), a whole prompt and a chunk continuing a cached prefix.
    slots, cached = [5, 0, 3, 1, 7], [8, 0, 2, 6, 29]
    cache = KVCache(config, 8, 64)
    earlier = [SequenceChunk(s, p[:c], 0, logits=False)
               for s, p, c in zip(slots, prompts, cached) if c]
    assert tiny_model(PackedBatch.pack(earlier), cache).shape == (0, config.vocab_size)
    step = [SequenceChunk(s, p[c:], c) for s, p, c in zip(slots, prompts, cached)]
    logits = tiny_model(PackedBatch.pack(step, batched_decode_max_context=batched_decode_max_context),
                        cache)
    assert_close(logits, alone, atol=1e-5, rtol=0)


def test_logits_only_for_chunks_that_ask(tiny_model):
    prompts = [random_tokens(n, seed=n) for n in (4, 6, 2)]
    alone = [run_chunks(tiny_model, KVCache(tiny_model.config, 1, 16), 0, p, [len(p)])[0]
             for p in prompts]
    chunks = [SequenceChunk(slot, p, 0, logits=slot != 1) for slot, p in enumerate(prompts)]
    logits = tiny_model(PackedBatch.pack(chunks), KVCache(tiny_model.config, 3, 16))
    assert_close(logits, torch.stack([alone[0], alone[2]]), atol=1e-5, rtol=0)


def test_chunked_prefill_equals_full_prefill(tiny_model):
    tokens = random_tokens(40)
    full_cache, chunked_cache = KVCache(tiny_model.config, 1, 48), KVCache(tiny_model.config, 1, 48)
    full = run_chunks(tiny_model, full_cache, 0, tokens, [40])[-1]
    chunked = run_chunks(tiny_model, chunked_cache, 0, tokens, [16, 1, 7, 16])[-1]
    assert_close(chunked, full, atol=1e-5, rtol=0)
    assert_close(chunked_cache.keys, full_cache.keys, atol=1e-5, rtol=0)
    assert_close(chunked_cache.values, full_cache.values, atol=1e-5, rtol=0)


def test_forward_writes_its_slot_in_place(tiny_model):
    cache = KVCache(tiny_model.config, 3, 32)
    keys, values = cache.keys, cache.values
    addresses = (keys.data_ptr(), values.data_ptr())
    run_chunks(tiny_model, cache, 1, random_tokens(10), [6, 1, 1, 1, 1])
    assert cache.keys is keys and cache.values is values
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == addresses
    for tensor in (cache.keys, cache.values):
        assert tensor[:, 1, :, :10].abs().amin(dim=-1).gt(0).all()  # every position written
        assert not tensor[:, [0, 2]].any() and not tensor[:, 1, :, 10:].any()  # nothing else


def test_copied_prefix_continues_like_the_original(tiny_model):
    shared, own = random_tokens(20, seed=1), random_tokens(5, seed=2)
    cache = KVCache(tiny_model.config, 2, 32)
    run_chunks(tiny_model, cache, 0, shared, [20])
    cache.copy_prefix(source_slot=0, target_slot=1, length=20)
    logits = tiny_model(PackedBatch.pack([SequenceChunk(1, own, 20)]), cache)[0]
    alone = run_chunks(tiny_model, KVCache(tiny_model.config, 1, 32), 0, shared + own, [25])[0]
    assert_close(logits, alone, atol=1e-5, rtol=0)


def test_cache_size_follows_the_budget(tiny_config):
    per_token = KVCache.bytes_per_token(tiny_config, torch.float32)
    assert per_token == 2 * 2 * 2 * 8 * 4  # keys+values, layers, kv heads, head_dim, float32
    budget = per_token * 32 * 5 + 100
    cache = KVCache.within_budget(tiny_config, budget, max_seq_len=32)
    assert (cache.num_slots, cache.max_seq_len) == (5, 32) and cache.nbytes <= budget
    with pytest.raises(ValueError, match="holds no slot"):
        KVCache.within_budget(tiny_config, per_token * 31, max_seq_len=32)


@pytest.mark.parametrize("chunks, cache_args, message", [
    ([SequenceChunk(4, [1], 0)], (4, 16, torch.float32), "slot 4 is out of range"),
    ([SequenceChunk(0, [1, 2], 15)], (4, 16, torch.float32), "would reach 17 tokens"),
    ([SequenceChunk(0, [1], 0), SequenceChunk(0, [2], 1)], (4, 16, torch.float32), "slot may appear once"),
    ([SequenceChunk(0, [], 0)], (4, 16, torch.float32), "has no tokens"),
    ([], (4, 16, torch.float32), "at least one"),
    ([SequenceChunk(0, [1], 0)], (4, 16, torch.bfloat16), "KV cache is torch.bfloat16"),
], ids=["slot", "length", "duplicate", "empty-chunk", "no-chunks", "dtype"])
def test_bad_batches_are_refused(tiny_model, chunks, cache_args, message):
    cache = KVCache(tiny_model.config, *cache_args)
    with pytest.raises(ValueError, match=message):
        tiny_model(PackedBatch.pack(chunks), cache)


def test_cache_for_another_model_is_refused(tiny_model):
    other = ModelConfig.tiny(num_layers=3)
    with pytest.raises(ValueError, match="does not fit this model"):
        tiny_model(PackedBatch.pack([SequenceChunk(0, [1], 0)]), KVCache(other, 1, 8))


def test_bfloat16_model_follows_float32(tiny_config, tmp_path):
    from ringlm.server.model.weights import random_weights, save_hf
    save_hf(tiny_config, random_weights(tiny_config, seed=3), tmp_path)
    tokens = random_tokens(12)
    results = []
    for dtype in ("float32", "bfloat16"):
        model = load_model(tmp_path, device="cpu", dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        results.append(run_chunks(model, KVCache(tiny_config, 1, 16, model.dtype), 0, tokens, [12])[0])
    assert_close(results[1].float(), results[0], atol=0.1, rtol=0.05)


def test_thread_setting():
    assert default_torch_threads(cores=2) == 1 and default_torch_threads(cores=4) == 1
    assert default_torch_threads(cores=16) == 14
    previous = torch.get_num_threads()
    try:
        assert apply_torch_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="at least one"):
        apply_torch_threads(0)


def test_real_model_logits_match_transformers(real_model, real_model_transformers):
    with torch.no_grad():
        expected = real_model_transformers(torch.tensor([CHAT_PROMPT])).logits[0, -5:]
    sizes = [len(CHAT_PROMPT) - 4, 1, 1, 1, 1]
    logits = run_chunks(real_model, KVCache(real_model.config, 1, 32), 0, CHAT_PROMPT, sizes)
    assert_close(logits, expected, atol=5e-4, rtol=0)  # logits reach ~30; float32 sums differ in order


def test_real_model_greedy_matches_transformers_generate(real_model, real_model_transformers):
    prompts, new_tokens = [CHAT_PROMPT, PLAIN_PROMPT, CODE_PROMPT], 10
    expected = []
    for prompt in prompts:
        output = real_model_transformers.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
        expected.append(output[0, len(prompt):].tolist())
    # All three run together, one packed step per token.
    cache = KVCache(real_model.config, len(prompts), 32)
    chunks = [SequenceChunk(slot, prompt, 0) for slot, prompt in enumerate(prompts)]
    generated = [[] for _ in prompts]
    for _ in range(new_tokens):
        next_tokens = real_model(PackedBatch.pack(chunks), cache).argmax(dim=-1).tolist()
        chunks = [SequenceChunk(c.slot, [t], c.position + len(c.token_ids))
                  for c, t in zip(chunks, next_tokens)]
        for tokens, token in zip(generated, next_tokens):
            tokens.append(token)
    for ours, theirs in zip(generated, expected):
        assert theirs and ours[:len(theirs)] == theirs  # transformers stops early at EOS
