"""Where an engine step's time goes on the CPU: matrix multiplies, attention, other torch ops, and the rest.

The default model (float32, one torch thread) serves 1 and then 32 concurrent
requests (64-token prompts, 64 new tokens each, greedy, EOS ignored) while
torch's profiler records every operator. Each operator's self CPU time is put
in one group: matrix multiplies (aten::mm, addmm, bmm, matmul, linear),
attention (scaled dot-product attention kernels), and other torch operators
(norms, rotary embedding, SwiGLU, copies into the KV cache, packing). "Outside
torch" is the steps' wall time less all operator time: the scheduler, the
sampler (Cython), Python bookkeeping and the profiler's own cost, so it is an
upper bound for ringlm's own code. One profiled run per concurrency: the shares
move by a few points between runs on this shared machine.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import Tokenizer
from ringlm.ext.model_files import default_model_path
from ringlm.server.engine import Engine, EngineConfig, GenerationRequest
from ringlm.server.model.threads import apply_torch_threads
from ringlm.server.model.weights import load_model

PROMPT_TOKENS, NEW_TOKENS = 64, 64
CONCURRENCY = (1, 32)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
ATTENTION_MARK = "scaled_dot_product"


def requests(count: int) -> list[GenerationRequest]:
    greedy = SamplingParams(temperature=0.0)
    return [GenerationRequest(f"r{i}", torch.randint(1000, 40000, (PROMPT_TOKENS,),
                                                     generator=torch.Generator().manual_seed(i)).tolist(),
                              greedy, max_tokens=NEW_TOKENS, ignore_eos=True) for i in range(count)]


def group(name: str) -> str:
    if name in MATMUL_OPS:
        return "matrix multiplies"
    if ATTENTION_MARK in name:
        return "attention"
    return "other torch operators"


def profile_run(model, tokenizer: Tokenizer, count: int) -> dict[str, float]:
    """Milliseconds per group over all steps of one run with `count` concurrent requests."""
    engine = Engine(model, tokenizer, EngineConfig(num_slots=count, max_seq_len=PROMPT_TOKENS + NEW_TOKENS))
    for request in requests(count):
        engine.submit(request)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        engine.run_until_idle()
        wall_ms = (time.perf_counter() - started) * 1000
    groups = {"matrix multiplies": 0.0, "attention": 0.0, "other torch operators": 0.0}
    for event in profiler.key_averages():
        groups[group(event.key)] += event.self_cpu_time_total / 1000
    groups["outside torch (scheduler, sampler, Python)"] = max(wall_ms - sum(groups.values()), 0.0)
    groups["steps"] = engine.counters["steps"]
    groups["wall"] = wall_ms
    return groups


def main() -> str:
    threads = apply_torch_threads(1)
    path = default_model_path()
    tokenizer = Tokenizer.from_gguf(path)
    model = load_model(path, device="cpu", dtype=torch.float32)
    profile_run(model, tokenizer, 2)   # warm-up: allocator and kernel set-up
    runs = {count: profile_run(model, tokenizer, count) for count in CONCURRENCY}
    names = [name for name in runs[CONCURRENCY[0]] if name not in ("steps", "wall")]
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), CPU, torch threads: {threads}; "
             f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens each (greedy, EOS ignored); one "
             f"profiled run per concurrency, share of the steps' wall time.", "",
             "| group | " + " | ".join(f"{c} concurrent" for c in CONCURRENCY) + " |",
             "|---|" + "---:|" * len(CONCURRENCY)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{100 * runs[c][name] / runs[c]['wall']:.1f}%"
                                                for c in CONCURRENCY) + " |")
    lines.append("| ms per step | " + " | ".join(f"{runs[c]['wall'] / runs[c]['steps']:.1f}"
                                                for c in CONCURRENCY) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
