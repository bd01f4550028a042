"""Tokenizer throughput: ringlm against Hugging Face `tokenizers` and `tiktoken`, one run.

All three use SmolLM2's vocabulary and merges and its split rule (tiktoken
through an equivalent regex, with the token ids as ranks: SmolLM2's merge
results' ids rise with merge order). Each figure is the median MB/s of
several rounds over the same documents; MB is 10^6 bytes of UTF-8 input.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from ringlm.ext import usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ROUNDS = 5
# SmolLM2's split (digits alone, then GPT-2's rule) as one regex for tiktoken.
SMOLLM_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"|\s+(?=\p{N})|\s+(?!\S)|\s+")


def median_seconds(run, rounds: int = ROUNDS) -> float:
    run()   # warm-up: caches, lazily built tables
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def contestants():
    import tiktoken
    from tokenizer_oracle import hf_tokenizer

    from ringlm.ext.model_files import default_model_path
    from ringlm.ext.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(default_model_path())
    hf = hf_tokenizer(ours.spec)
    special = set(ours.special_ids)
    ranks = {ours.token_bytes(i): i for i in range(ours.vocab_size) if i not in special}
    tik = tiktoken.Encoding("smollm2", pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return ours, hf, tik


def usable(documents: list[str], ours) -> list[str]:
    """Documents every contestant can encode (tiktoken fails on bytes with no token)."""
    missing = set(ours._core.bytes_without_token())
    return [d for d in documents if not missing.intersection(d.encode("utf-8"))]


def measure_subset(documents: list[str], ours, hf, tik, threads: int) -> dict[str, float]:
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    hf_ids = [hf.encode(d).ids for d in documents]
    same_as_hf = sum(ours.encode(d) == ids for d, ids in zip(documents, hf_ids)) / len(documents)
    ours_ids = [ours.encode(d, parse_special=False) for d in documents]   # no special ids: tiktoken has none
    timings = {
        "ringlm encode": lambda: [ours.encode(d, parse_special=False) for d in documents],
        "tiktoken encode": lambda: [tik.encode_ordinary(d) for d in documents],
        "HF encode": lambda: [hf.encode(d) for d in documents],
        f"ringlm batch x{threads}": lambda: ours.encode_batch(documents, parse_special=False,
                                                              num_threads=threads),
        f"tiktoken batch x{threads}": lambda: tik.encode_ordinary_batch(documents, num_threads=threads),
        f"HF batch x{threads}": lambda: hf.encode_batch(documents),
        "ringlm decode": lambda: [ours.decode(ids) for ids in ours_ids],
        "tiktoken decode": lambda: [tik.decode(ids) for ids in ours_ids],
        "HF decode": lambda: [hf.decode(ids) for ids in ours_ids],
    }
    result = {name: megabytes / median_seconds(run) for name, run in timings.items()}
    result["same ids as HF (ringlm)"] = same_as_hf
    result["same ids as HF (tiktoken)"] = sum(tik.encode_ordinary(d) == ids
                                              for d, ids in zip(documents, hf_ids)) / len(documents)
    result["MB"] = megabytes
    return result


def table(results: dict[str, dict[str, float]], threads: int) -> str:
    subsets = list(results)
    rows = ["| measure | " + " | ".join(subsets) + " |", "|---|" + "---:|" * len(subsets)]
    names = [n for n in next(iter(results.values())) if not n.startswith("same") and n != "MB"]
    rows.append("| input MB | " + " | ".join(f"{results[s]['MB']:.2f}" for s in subsets) + " |")
    for name in names:
        rows.append(f"| {name} (MB/s) | " + " | ".join(f"{results[s][name]:.1f}" for s in subsets) + " |")
    for ratio, (a, b) in {"ringlm / tiktoken, encode": ("ringlm encode", "tiktoken encode"),
                          "ringlm / HF, encode": ("ringlm encode", "HF encode"),
                          f"ringlm batch x{threads} / ringlm encode": (f"ringlm batch x{threads}", "ringlm encode"),
                          "ringlm / tiktoken, decode": ("ringlm decode", "tiktoken decode")}.items():
        rows.append(f"| **{ratio}** | " + " | ".join(f"{results[s][a] / results[s][b]:.2f}x" for s in subsets) + " |")
    for name in ("same ids as HF (ringlm)", "same ids as HF (tiktoken)"):
        rows.append(f"| {name}, share of documents | " + " | ".join(f"{results[s][name]:.3f}" for s in subsets) + " |")
    return "\n".join(rows)


def main() -> str:
    from corpus import corpus

    threads = usable_cores()
    ours, hf, tik = contestants()
    results = {name: measure_subset(usable(docs, ours), ours, hf, tik, threads)
               for name, docs in corpus().items()}
    text = (f"Median of {ROUNDS} rounds, MB/s of UTF-8 input (higher is better); "
            f"batch = every document in one call on {threads} threads.\n\n" + table(results, threads))
    print(text)
    return text


if __name__ == "__main__":
    main()
