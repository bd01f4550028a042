"""The load-test harness: drive a ringlm cluster or an OpenAI-compatible endpoint, measure, report.

A run sends streamed requests at a fixed concurrency or as open-loop Poisson
arrivals, records for each request when it started, when each output token
arrived and how it ended, and summarises: requests ok/failed by reason, output
tokens/s, requests/s, TTFT, time per output token and end-to-end latency
percentiles, and the prefix-cache hit rate. Greenlets carry the concurrency,
so the calling program must have gevent's monkey patching on (the CLI does).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gevent
import gevent.pool
import numpy as np

from ringlm.client.result import PRIORITIES

PERCENTILES = (50, 90, 99)


@dataclass
class RequestSpec:
    prompt: str | None = None
    messages: list[dict] | None = None
    session: str | None = None
    max_tokens: int = 64
    priority: str = "normal"


@dataclass
class Sample:
    """One request as the harness saw it; times in seconds from the run's start."""

    start_s: float
    end_s: float = 0.0
    ok: bool = False
    outcome: str = ""                    # a finish reason when ok, an error name when not
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    priority: str = "normal"
    token_times_s: list[float] = field(default_factory=list)   # arrival of each output token

    @property
    def ttft_ms(self) -> float | None:
        return (self.token_times_s[0] - self.start_s) * 1000 if self.token_times_s else None

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times_s) < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) * 1000 / (len(self.token_times_s) - 1)

    @property
    def e2e_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000


# ---------------------------------------------------------------- workloads

SHORT_QUESTIONS = [
    "What is a hash ring?", "Name three prime numbers.", "Why is the sky blue?",
    "Write a haiku about servers.", "What does TTFT mean?", "Explain a KV cache in one sentence.",
    "How do I reverse a list in Python?", "What is the capital of Japan?",
]
LONG_CONTEXT = ("Consistent hashing places servers and keys on a circle so that adding or removing a "
                "server moves only the keys next to it. Bounded loads cap how many requests any one "
                "server takes, sending the overflow to the next server clockwise. ") * 6


def builtin_workload(max_tokens: int, seed: int = 0) -> Iterator[RequestSpec]:
    """Endless mix: short questions, long prompts, and multi-turn sessions sharing a prefix."""
    rng = random.Random(seed)
    sessions: dict[str, list[dict]] = {}
    for index in itertools.count():
        kind = rng.random()
        if kind < 0.5:
            yield RequestSpec(prompt=rng.choice(SHORT_QUESTIONS), max_tokens=max_tokens)
        elif kind < 0.7:
            yield RequestSpec(prompt=LONG_CONTEXT + rng.choice(SHORT_QUESTIONS), max_tokens=max_tokens)
        else:
            name = f"session-{rng.randrange(8)}"
            history = sessions.setdefault(name, [{"role": "system", "content": LONG_CONTEXT}])
            history.append({"role": "user", "content": f"Turn {index}: {rng.choice(SHORT_QUESTIONS)}"})
            yield RequestSpec(messages=list(history), session=name, max_tokens=max_tokens)
            history.append({"role": "assistant", "content": "Noted."})
            del history[1:-8]   # keep sessions from growing without bound


def jsonl_workload(path: Path, max_tokens: int) -> Iterator[RequestSpec]:
    """Cycle through a JSONL file of {"prompt"|"messages", "session"?, "max_tokens"?, "priority"?}."""
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            specs.append(RequestSpec(prompt=item.get("prompt"), messages=item.get("messages"),
                                     session=item.get("session"), max_tokens=item.get("max_tokens", max_tokens),
                                     priority=item.get("priority", "normal")))
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: not a JSON object with prompt or messages ({error})") from None
        if specs[-1].prompt is None and specs[-1].messages is None:
            raise ValueError(f"{path}:{number}: needs 'prompt' or 'messages'")
    if not specs:
        raise ValueError(f"{path}: no requests in the file")
    return itertools.cycle(specs)


def with_priorities(specs: Iterator[RequestSpec], mix: dict[str, float], seed: int = 0) -> Iterator[RequestSpec]:
    """Assign priorities at random in the given proportions."""
    rng = random.Random(seed)
    names, weights = zip(*mix.items())
    for spec in specs:
        spec.priority = rng.choices(names, weights)[0]
        yield spec


def parse_priority_mix(text: str) -> dict[str, float]:
    """'high=0.1,normal=0.8,low=0.1' -> {'high': 0.1, ...}."""
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in PRIORITIES or not share:
            raise ValueError(f"bad priority mix entry {part!r}: use e.g. high=0.1,normal=0.9")
        mix[name.strip()] = float(share)
    if sum(mix.values()) <= 0:
        raise ValueError("the priority mix needs a positive share")
    return mix


# ---------------------------------------------------------------- running

def run_one(target, spec: RequestSpec, clock: Callable[[], float]) -> Sample:
    sample = Sample(start_s=clock(), priority=spec.priority)
    try:
        for new_tokens in target.stream(spec, sample):
            now = clock()
            sample.token_times_s.extend([now] * new_tokens)
        sample.ok = sample.outcome in ("", "stop", "length")
        sample.outcome = sample.outcome or "stop"
    except Exception as error:   # every failure is data for the report
        sample.ok, sample.outcome = False, type(error).__name__
    sample.output_tokens = len(sample.token_times_s)
    sample.end_s = clock()
    return sample


def run_load(target, specs: Iterator[RequestSpec], *, concurrency: int | None = None,
             rate: float | None = None, requests: int | None = None, duration_s: float | None = None,
             on_sample: Callable[[Sample], None] | None = None, seed: int = 0) -> tuple[list[Sample], float]:
    """Run until `requests` are done or `duration_s` has passed; returns the samples and wall time."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open-loop arrivals)")
    if requests is None and duration_s is None:
        raise ValueError("give a request count, a duration, or both")
    start = time.monotonic()
    clock = lambda: time.monotonic() - start
    budget = itertools.count() if requests is None else iter(range(requests))
    samples: list[Sample] = []

    def record(sample: Sample) -> None:
        samples.append(sample)
        if on_sample:
            on_sample(sample)

    def time_left() -> bool:
        return duration_s is None or clock() < duration_s

    if concurrency is not None:
        def worker():
            for _ in budget:
                if not time_left():
                    return
                record(run_one(target, next(specs), clock))
        gevent.joinall([gevent.spawn(worker) for _ in range(concurrency)])
    else:
        arrivals = random.Random(seed)
        pool = gevent.pool.Group()
        for _ in budget:
            if not time_left():
                break
            pool.spawn(lambda spec: record(run_one(target, spec, clock)), next(specs))
            gevent.sleep(arrivals.expovariate(rate))
        pool.join()
    return samples, clock()


# ---------------------------------------------------------------- reporting

def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 with linear interpolation between samples (numpy's default)."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def summarize(samples: list[Sample], wall_s: float, target: str) -> dict:
    ok = [s for s in samples if s.ok]
    prompt_tokens = sum(s.prompt_tokens for s in ok)
    output_tokens = sum(s.output_tokens for s in ok)
    return {
        "target": target,
        "wall_s": wall_s,
        "requests_ok": len(ok),
        "requests_failed": len(samples) - len(ok),
        "outcomes": dict(Counter(s.outcome for s in samples)),
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": percentiles([s.ttft_ms for s in ok if s.ttft_ms is not None]),
        "tpot_ms": percentiles([s.tpot_ms for s in ok if s.tpot_ms is not None]),
        "e2e_ms": percentiles([s.e2e_ms for s in ok]),
        "prefix_cache_hit_rate": (sum(s.cached_prompt_tokens for s in ok) / prompt_tokens
                                  if prompt_tokens else None),
        "samples": [asdict(s) for s in samples],
    }


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def table_rows(summary: dict) -> list[tuple[str, str]]:
    rows = [("requests ok", _cell(summary["requests_ok"])), ("requests failed", _cell(summary["requests_failed"]))]
    rows += [(f"  {name}", _cell(count)) for name, count in sorted(summary["outcomes"].items())
             if name not in ("stop", "length")]
    rows += [("output tokens/s", _cell(summary["output_tokens_per_s"])),
             ("requests/s", _cell(summary["requests_per_s"], 2))]
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for name, value in summary[metric].items():
            rows.append((f"{metric.removesuffix('_ms')} {name} (ms)", _cell(value)))
    rate = summary["prefix_cache_hit_rate"]
    rows.append(("prefix-cache hit rate", "-" if rate is None else f"{rate:.1%}"))
    return rows


def render_table(summaries: list[dict], names: list[str]) -> str:
    """A plain-text table, one column per run (the comparison mode uses several)."""
    rows = [table_rows(s) for s in summaries]
    labels = [label for label, _ in rows[0]]
    width = max(len(label) for label in labels)
    columns = [max(len(name), *(len(row[i][1]) for i in range(len(labels)))) for name, row in zip(names, rows)]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, columns))]
    for i, label in enumerate(labels):
        cells = [row[i][1] if i < len(row) else "-" for row in rows]
        lines.append(label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, columns)))
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Latency CDFs (TTFT, end-to-end) and output tokens/s over time, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [Sample(**s) for s in summary["samples"]]
    ok = [s for s in samples if s.ok]
    figure, (cdf, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in (("TTFT", [s.ttft_ms for s in ok if s.ttft_ms is not None]),
                         ("end to end", [s.e2e_ms for s in ok])):
        if values:
            ordered = np.sort(values)
            cdf.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=name)
    cdf.set(xlabel="latency (ms)", ylabel="fraction of requests", title="Latency CDF")
    cdf.legend()
    times = [t for s in ok for t in s.token_times_s]
    if times:
        bins = np.arange(0, max(times) + 1.0, 1.0)
        counts, edges = np.histogram(times, bins=bins if len(bins) > 1 else 1)
        throughput.step(edges[:-1], counts, where="post")
    throughput.set(xlabel="time (s)", ylabel="output tokens/s", title="Throughput over time")
    figure.suptitle(f"{summary['target']}: {summary['requests_ok']} ok, "
                    f"{summary['output_tokens_per_s']:.1f} tokens/s")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
