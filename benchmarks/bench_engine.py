"""Serving speed of our Engine against transformers' generate: output tokens/s and time to first token, default model on the CPU.

Every request has a 64-token prompt and generates 64 tokens greedily with EOS
ignored, so every run does the same work. Ours submits 1, 8 or 32 requests at
once to an `Engine` and steps it until idle on the calling thread (no gevent
threadpool hop: the default `offload`); output tokens/s counts generated tokens over
the whole run, prefill included. transformers serves one request at a time
(`generate` per prompt) and, as the strong peer, all 32 prompts as one batch
(equal lengths, so the left padding is empty). Time to first token is from
submission to the first sampled token (ours: the engine's `ttft_ms`; theirs: the
first call of a logits processor, which runs right after the prefill forward).
Both sides run float32 (transformers' GGUF loader dequantizes to it) with one
torch thread; one more row runs our engine in bfloat16, the dtype a CPU without
bfloat16 arithmetic has to convert, to show why float32 is the CPU default.
Each configuration runs `rounds` times, interleaved so that load from other
processes on this shared machine falls on both sides alike; the table shows
medians.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import Tokenizer
from ringlm.ext.model_files import default_model_path
from ringlm.server.engine.config import EngineConfig
from ringlm.server.engine.engine import Engine
from ringlm.server.engine.request import GenerationRequest
from ringlm.server.model.threads import apply_torch_threads
from ringlm.server.model.weights import load_model

PROMPT_TOKENS, NEW_TOKENS = 64, 64
CONCURRENCY = (1, 8, 32)
ROUNDS = 3


@dataclass
class Run:
    tokens_per_second: float  # generated tokens of all requests over the run's wall time
    ttft_ms: float            # median over the run's requests
    tpot_ms: float            # median time per output token after the first
    token_ids: list[list[int]]


def prompts(count: int) -> list[list[int]]:
    return [torch.randint(1000, 40000, (PROMPT_TOKENS,),
                          generator=torch.Generator().manual_seed(i)).tolist() for i in range(count)]


def engine_run(model, tokenizer: Tokenizer, count: int) -> Run:
    engine = Engine(model, tokenizer, EngineConfig(num_slots=max(CONCURRENCY),
                                                   max_seq_len=PROMPT_TOKENS + NEW_TOKENS))
    greedy = SamplingParams(temperature=0.0)
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"r{i}", prompt, greedy, max_tokens=NEW_TOKENS,
                                               ignore_eos=True))
               for i, prompt in enumerate(prompts(count))]
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    results = [handle.result() for handle in handles]
    assert all(r.completion_tokens == NEW_TOKENS for r in results)
    return Run(count * NEW_TOKENS / elapsed, statistics.median(r.ttft_ms for r in results),
               statistics.median((r.total_ms - r.ttft_ms) / (NEW_TOKENS - 1) for r in results),
               [r.token_ids for r in results])


class FirstLogits:
    """A logits processor that only notes when generate first asks it (the first token's logits)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def transformers_run(model, batch: list[list[int]]) -> Run:
    from transformers import GenerationConfig, LogitsProcessorList
    first = FirstLogits()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             logits_processor=LogitsProcessorList([first]))
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS
    ttft = first.at - start
    return Run(len(batch) * NEW_TOKENS / elapsed, 1000 * ttft, 1000 * (elapsed - ttft) / (NEW_TOKENS - 1),
               out[:, PROMPT_TOKENS:].tolist())


def median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs)
                 for f in ("tokens_per_second", "ttft_ms", "tpot_ms")), runs[0].token_ids)


def main(rounds: int = ROUNDS) -> str:
    threads = apply_torch_threads(1)
    path = default_model_path()
    tokenizer = Tokenizer.from_gguf(path)
    models = {dtype: load_model(path, device="cpu", dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    model = models[torch.float32]
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    # No EOS, so generate runs on past it as ours does with ignore_eos (min_new_tokens would
    # instead mask EOS and change the greedy choice where EOS is the best token).
    reference.generation_config.eos_token_id = None
    engine_run(model, tokenizer, 2)                    # warm-up: allocator and kernel set-up
    transformers_run(reference, prompts(1))
    engine_run(models[torch.bfloat16], tokenizer, 1)
    runs: dict[tuple[str, str, int], list[Run]] = {}
    for _ in range(rounds):
        runs.setdefault(("transformers, one at a time", "float32", 1), []).append(
            transformers_run(reference, prompts(1)))
        for count in CONCURRENCY:
            runs.setdefault(("ringlm Engine", "float32", count), []).append(
                engine_run(model, tokenizer, count))
        runs.setdefault(("ringlm Engine", "bfloat16", 1), []).append(
            engine_run(models[torch.bfloat16], tokenizer, 1))
        runs.setdefault(("transformers, batched", "float32", 32), []).append(
            transformers_run(reference, prompts(32)))
    medians = {key: median_run(value) for key, value in runs.items()}
    single = medians[("transformers, one at a time", "float32", 1)]
    batched = medians[("transformers, batched", "float32", 32)]
    oracle = batched.token_ids
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), CPU, torch threads: {threads} on both "
             f"sides; {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens each "
             f"(greedy, EOS ignored); medians of {rounds} rounds. Ratios are output tokens/s over "
             f"transformers one request at a time, and over transformers batched; time per output "
             f"token is each request's decode time after its first token.", "",
             "| engine | dtype | concurrent requests | output tokens/s | vs one at a time "
             "| vs batched | median TTFT ms | time per output token ms | tokens equal transformers' |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, dtype, count), run in medians.items():
        same = "yes" if run.token_ids == oracle[:count] else "no"
        lines.append(f"| {name} | {dtype} | {count} | {run.tokens_per_second:.1f} "
                     f"| {run.tokens_per_second / single.tokens_per_second:.2f}x "
                     f"| {run.tokens_per_second / batched.tokens_per_second:.2f}x "
                     f"| {run.ttft_ms:.0f} | {run.tpot_ms:.1f} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS))
