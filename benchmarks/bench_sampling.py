"""Sampler speed: ringlm's Cython sampler against torch and numpy on the CPU, one run.

Microseconds per call turning [B, 49152] float32 logits into B tokens, with top-k=50 and with
top-p=0.9 (temperature 1), each the median of several rounds. The floor is the time numpy
takes to read the logits once (a max per row): no sampler can beat it by much.

Every contestant runs on one thread, so the figures compare work done rather than how busy
the other cores are; ringlm also runs on every core (its default), which is what a server
gets when its cores are free.

The logits are synthetic but shaped like SmolLM2-135M's (vocabulary 49152): a Gaussian bulk
(sd 3.5) with 16 tokens spread up to 12 above it. Their nucleus at top_p=0.9 holds 2, 7 and
98 tokens at the 10th, 50th and 90th percentiles, against 1, 4.5 and 76 measured on the model.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ringlm.ext import usable_cores
from ringlm.ext.sampling import SamplingParams, sample

VOCAB = 49152
BATCHES = (1, 8, 32, 128)
ROUNDS = 15
ROUND_SECONDS = 4.0   # slow contestants stop after this long (at least 3 rounds)
TOP_K = 50
TOP_P = 0.9
CORES = usable_cores()


def language_model_like(rows: int, seed: int = 0) -> np.ndarray:
    """[rows, VOCAB] logits shaped like SmolLM2's (see the module docstring)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, VOCAB)) * 3.5).astype(np.float32)
    for row in logits:
        head = rng.choice(VOCAB, 16, replace=False)
        row[head] = row.max() + rng.uniform(0, 12) * rng.uniform(0, 1, 16) ** 2
    return logits


def median_microseconds(run) -> float:
    run()   # warm-up: thread pools, allocator
    times = []
    while len(times) < ROUNDS and (len(times) < 3 or sum(times) < ROUND_SECONDS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def torch_top_k(logits: torch.Tensor) -> torch.Tensor:
    values, ids = torch.topk(logits, TOP_K, dim=1)
    choice = torch.multinomial(torch.softmax(values, dim=1), 1)
    return ids.gather(1, choice)


def torch_top_p(logits: torch.Tensor) -> torch.Tensor:
    ordered, ids = torch.sort(logits, dim=1, descending=True)
    probs = torch.softmax(ordered, dim=1)
    outside = probs.cumsum(dim=1) - probs >= TOP_P
    choice = torch.multinomial(torch.softmax(ordered.masked_fill(outside, -torch.inf), dim=1), 1)
    return ids.gather(1, choice)


def numpy_draw(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index of a softmax draw in each row of `values` (-inf allowed)."""
    weights = np.exp(values - values.max(axis=1, keepdims=True))
    cumulative = weights.cumsum(axis=1)
    targets = rng.random((len(values), 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= targets).sum(axis=1), values.shape[1] - 1)


def numpy_top_k(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = np.argpartition(-logits, TOP_K, axis=1)[:, :TOP_K]
    choice = numpy_draw(np.take_along_axis(logits, ids, axis=1), rng)
    return np.take_along_axis(ids, choice[:, None], axis=1)


def numpy_top_p(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = np.argsort(-logits, axis=1)   # a nucleus needs the order: argpartition cannot give it
    ordered = np.take_along_axis(logits, ids, axis=1)
    probs = np.exp(ordered - ordered[:, :1])
    probs /= probs.sum(axis=1, keepdims=True)
    outside = probs.cumsum(axis=1) - probs >= TOP_P
    choice = numpy_draw(np.where(outside, -np.inf, ordered), rng)
    return np.take_along_axis(ids, choice[:, None], axis=1)


def measure(batch: int, name: str, params: SamplingParams) -> dict[str, float]:
    logits = language_model_like(batch)
    tensor = torch.from_numpy(logits)
    rows = [params] * batch
    positions = np.arange(batch)
    rng = np.random.default_rng(0)
    torch_run, numpy_run = (torch_top_k, numpy_top_k) if name == "top-k" else (torch_top_p, numpy_top_p)
    return {
        "ringlm": median_microseconds(lambda: sample(logits, rows, positions, threads=1)),
        "ringlm_all": median_microseconds(lambda: sample(logits, rows, positions, threads=CORES)),
        "torch": median_microseconds(lambda: torch_run(tensor)),
        "numpy": median_microseconds(lambda: numpy_run(logits, rng)),
        "floor": median_microseconds(lambda: logits.max(axis=1)),
    }


def main() -> str:
    """Run the benchmark; print and return its markdown table."""
    settings = {"top-k": SamplingParams(top_k=TOP_K, seed=1), "top-p": SamplingParams(top_p=TOP_P, seed=1)}
    lines = [f"Sampling [B, {VOCAB}] float32 logits: microseconds per call, median of up to {ROUNDS} rounds.",
             "",
             f"| filter | B | ringlm | ringlm, {CORES} threads | torch | numpy | read once (floor) "
             f"| torch / ringlm | ringlm / floor | ringlm {CORES} threads / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, params in settings.items():
            for batch in BATCHES:
                t = measure(batch, name, params)
                lines.append(
                    f"| {name} | {batch} | {t['ringlm']:.0f} | {t['ringlm_all']:.0f} | {t['torch']:.0f} "
                    f"| {t['numpy']:.0f} | {t['floor']:.0f} | {t['torch'] / t['ringlm']:.1f}x "
                    f"| {t['ringlm'] / t['floor']:.1f}x | {t['ringlm_all'] / t['floor']:.1f}x |")
    finally:
        torch.set_num_threads(torch_threads)
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
