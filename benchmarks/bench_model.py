"""Decode speed of our packed forward against transformers' generate, default model on the CPU.

Every run feeds a 64-token prompt and generates 32 tokens greedily; tokens/s
counts generated tokens over the whole run (prefill included), so both sides
pay for the same work. Ours runs batches of 1 and 8 sequences in one packed
step; transformers runs one request at a time, float32 (its GGUF loader's dtype).
"""

from __future__ import annotations

import time

import torch

from ringlm.models import default_model_path
from ringlm.server.engine.kv_cache import KVCache
from ringlm.server.model.llama import Llama, PackedBatch, SequenceChunk
from ringlm.server.model.threads import apply_torch_threads
from ringlm.server.model.weights import read_checkpoint

PROMPT_TOKENS, NEW_TOKENS = 64, 32


def prompt(seed: int) -> list[int]:
    return torch.randint(1000, 40000, (PROMPT_TOKENS,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def ours_tokens_per_second(model: Llama, batch: int) -> float:
    """Greedy generation for `batch` sequences at once; generated tokens/s over the run."""
    cache = KVCache(model.config, batch, PROMPT_TOKENS + NEW_TOKENS, model.dtype)
    chunks = [SequenceChunk(slot, prompt(slot), 0) for slot in range(batch)]
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        next_tokens = model(PackedBatch.pack(chunks), cache).argmax(dim=-1).tolist()
        chunks = [SequenceChunk(c.slot, [t], c.position + len(c.token_ids))
                  for c, t in zip(chunks, next_tokens)]
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def transformers_tokens_per_second(model) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([prompt(0)]), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False)
    return NEW_TOKENS / (time.perf_counter() - start)


def main() -> str:
    threads = apply_torch_threads()
    path = default_model_path()
    config, weights = read_checkpoint(path)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = Llama.from_hf_weights(config, weights, "cpu", dtype)
        ours_tokens_per_second(model, 1)  # warm-up: first calls pay for allocator and kernel set-up
        for batch in (1, 8):
            rows.append(("ringlm forward", str(dtype).removeprefix("torch."), batch,
                         ours_tokens_per_second(model, batch)))
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    transformers_tokens_per_second(reference)
    rows.append(("transformers generate", "float32", 1, transformers_tokens_per_second(reference)))
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), CPU, torch threads: {threads}; "
             f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens each", "",
             "| engine | dtype | sequences | generated tokens/s |", "|---|---|---|---|"]
    lines += [f"| {engine} | {dtype} | {batch} | {rate:.1f} |" for engine, dtype, batch, rate in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
