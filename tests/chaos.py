"""Chaos: a supervised cluster under streams and generates from the ring client while its workers are killed.

`ringlm serve --workers 3` runs the cluster; 16 lanes of streams and 2 of
generates go through one `ringlm.client.Client`, each lane starting its next
request as soon as the last ended; every `kill_interval_s` one ready worker
gets SIGKILL (never the supervisor, which restarts it). Each request ends one
of three ways:

- ok: it finished;
- failed: it raised one of the client's typed errors (`RinglmError`), counted by type;
- lost: neither, within its deadline plus `LOST_AFTER_S`: it hung, or raised
  something untyped (a bug either way).

The tokens of every request, and the partial tokens of failed ones, are
compared with those of the same request on the undisturbed cluster, computed
first. The requests are greedy: a resumed stream or a retried generate must then
reproduce the undisturbed run exactly, except where two candidate tokens are
closer than the float rounding between batch shapes (~1e-6 in logprob on the
tiny model: docs/architecture.md, "Determinism, and its limit"). Seeded top-k
sampling has the same limit at every cumulative-probability boundary near the
draw, which a client cannot see (the top logprobs it gets are those of the kept
tokens); greedy's only weak spot is a top-two gap, which the undisturbed run
reports (`top_logprobs=2`). Requests whose undisturbed run has a gap under
`NEAR_TIE` (1000x the rounding) somewhere are left out of the workload and counted
as screened, so a differing stream is a real fault, never rounding. The seeded
draw itself survives failover in tests/test_client.py's kill test (top_k=20).

`python -m tests.chaos --duration-s 300` runs it and prints the table
(`make chaos`); `--json` keeps the figures and every request, `--doc
RELIABILITY.md` writes the table into that file's chaos section.
tests/test_chaos.py runs a short one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ringlm.client import Client
from ringlm.client.errors import RinglmError
from tests.server_helpers import SupervisedCluster, write_tiny_model

WORKERS = 3
STREAM_LANES = 16
GENERATE_LANES = 2
KILL_INTERVAL_S = 10.0
DEADLINE_MS = 60_000
FAILURE_PAUSE_S = 1.0    # a lane waits this long after a failed request, as a client honouring retry-after would
LOST_AFTER_S = 30.0      # past its deadline, how long a request may take to end before it counts as lost
NEAR_TIE = 1e-3          # logprob gap under which the undisturbed run's top two tokens count as tied
DISTINCT_REQUESTS = 48
SCREEN_CONCURRENCY = 16

log = logging.getLogger("ringlm.chaos")

WORDS = ("ring hash server token stream cache prefix batch worker deadline river mountain lamp paper orbit "
         "garden signal engine window harbour ledger violin copper meadow").split()


@dataclass
class ChaosRequest:
    """One request of the workload: what is sent, and the tokens the undisturbed cluster answered."""

    index: int
    prompt: str
    max_tokens: int
    session: str | None = None
    expected: list[int] = field(default_factory=list)
    min_gap: float = 0.0          # the smallest top-two logprob gap of the undisturbed run

    def arguments(self) -> dict:
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, session=self.session, ignore_eos=True,
                    deadline_ms=DEADLINE_MS)


@dataclass
class Outcome:
    """One request as a lane saw it; times in seconds from the chaos phase's start."""

    index: int
    kind: str                     # "stream" or "generate"
    start_s: float
    end_s: float | None = None    # None while running (or hung)
    ttft_s: float | None = None
    status: str = "running"       # ok, failed, lost
    error: str = ""               # the typed error's class name, or why it counts as lost
    detail: str = ""              # the error's message
    tokens: list[int] = field(default_factory=list)
    differs: bool = False
    failed_over_from: list[str] = field(default_factory=list)


@dataclass
class Kill:
    at_s: float
    address: str
    pid: int
    restarted_pid: int | None = None


def workload(count: int, seed: int = 0) -> list[ChaosRequest]:
    """Distinct greedy requests: short and long prompts, 16 to 64 new tokens, a quarter of them in
    sessions (routed by session, the rest by the prompt's opening)."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        length = rng.choice((4, 12, 40))
        prompt = f"Request {index}: " + " ".join(rng.choice(WORDS) for _ in range(length))
        session = f"chaos-session-{index % 6}" if index % 4 == 0 else None
        requests.append(ChaosRequest(index, prompt, max_tokens=rng.choice((16, 32, 48, 64)), session=session))
    return requests


def screen(client: Client, requests: list[ChaosRequest]) -> tuple[list[ChaosRequest], list[ChaosRequest]]:
    """Run every request on the undisturbed cluster (greedy, top two logprobs); the ones to use and the ones
    left out because two candidates were nearly tied somewhere."""
    def undisturbed(request: ChaosRequest) -> ChaosRequest:
        arguments = {**request.arguments(), "deadline_ms": None}
        result = client.generate(**arguments, top_logprobs=2)
        request.expected = list(result.token_ids)
        gaps = [row[0][1] - row[1][1] for row in result.top_logprobs if row and len(row) == 2]
        request.min_gap = min(gaps) if gaps else float("inf")
        return request

    with ThreadPoolExecutor(SCREEN_CONCURRENCY) as pool:
        done = list(pool.map(undisturbed, requests))
    return [r for r in done if r.min_gap >= NEAR_TIE], [r for r in done if r.min_gap < NEAR_TIE]


class Chaos:
    """The lanes, the killer and the bookkeeping of one run."""

    def __init__(self, cluster: SupervisedCluster, client: Client, requests: list[ChaosRequest], *,
                 duration_s: float, kill_interval_s: float = KILL_INTERVAL_S, stream_lanes: int = STREAM_LANES,
                 generate_lanes: int = GENERATE_LANES, seed: int = 0):
        self.cluster, self.client, self.requests = cluster, client, requests
        self.duration_s, self.kill_interval_s = duration_s, kill_interval_s
        self.lanes = ["stream"] * stream_lanes + ["generate"] * generate_lanes
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.kills: list[Kill] = []
        self.skipped_kills: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.start = 0.0
        self.wall_s = 0.0

    def clock(self) -> float:
        return time.monotonic() - self.start

    # -- the load

    def next_request(self) -> ChaosRequest:
        with self.lock:
            return self.rng.choice(self.requests)

    def lane(self, kind: str) -> None:
        while not self.stopping.is_set():
            request = self.next_request()
            outcome = Outcome(request.index, kind, start_s=self.clock())
            with self.lock:
                self.outcomes.append(outcome)
            self.run_one(request, outcome)
            if outcome.status == "failed":
                # Without a pause, a lane whose every node is ejected fails thousands of times a second
                # and starves the restarting workers of CPU.
                self.stopping.wait(FAILURE_PAUSE_S)

    def run_one(self, request: ChaosRequest, outcome: Outcome) -> None:
        stream = None
        try:
            if outcome.kind == "stream":
                stream = self.client.stream(**request.arguments())
                for _ in stream:
                    if outcome.ttft_s is None:
                        outcome.ttft_s = self.clock() - outcome.start_s
                result = stream.result
            else:
                result = self.client.generate(**request.arguments())
            tokens, status, error = list(result.token_ids), "ok", ""
            outcome.failed_over_from = list(result.failed_over_from or [])
        except RinglmError as typed:
            partial = getattr(typed, "partial", None)
            tokens = list(stream.token_ids) if stream is not None else list(partial.token_ids if partial else [])
            status, error = "failed", type(typed).__name__
            outcome.detail = str(typed)[:500]
        except Exception as untyped:   # not one of the client's errors: a bug, and the request is lost
            log.exception("request %d raised an untyped error", request.index)
            tokens, status, error = [], "lost", f"untyped {type(untyped).__name__}: {untyped}"
        with self.lock:
            if outcome.status != "running":
                return   # already counted lost by the watchdog; what came after does not change that
            outcome.end_s = self.clock()
            outcome.tokens = tokens
            outcome.status, outcome.error = status, error
            # A finished request must equal the undisturbed run; a failed one must be a prefix of it.
            expected = request.expected if status == "ok" else request.expected[:len(tokens)]
            outcome.differs = status != "lost" and tokens != expected

    def watch_for_lost(self) -> None:
        """Count requests running past their deadline plus LOST_AFTER_S as lost (their lanes stay stuck)."""
        limit = DEADLINE_MS / 1000 + LOST_AFTER_S
        with self.lock:
            now = self.clock()
            for outcome in self.outcomes:
                if outcome.status == "running" and now - outcome.start_s > limit:
                    outcome.status, outcome.error = "lost", f"no answer {limit:.0f} s after it started"
                    log.error("request %d (%s) lost: %s", outcome.index, outcome.kind, outcome.error)

    # -- the faults

    def kill_one(self) -> None:
        """SIGKILL the ready worker that has been up longest, if another stays ready (so the cluster keeps
        serving while the supervisor restarts it)."""
        statuses = {address: self.cluster.status(port, timeout_s=5.0)
                    for address, port in zip(self.cluster.addresses, self.cluster.ports)}
        ready = [(s.uptime_s, address, port) for (address, s), port in zip(statuses.items(), self.cluster.ports)
                 if s is not None and s.ready]
        if len(ready) < 2:
            self.skipped_kills.append((self.clock(), f"{len(ready)} worker(s) ready"))
            log.warning("kill skipped: only %d worker(s) ready", len(ready))
            return
        _, address, port = max(ready)
        pid = self.cluster.kill_worker(port)
        if pid is None:
            self.skipped_kills.append((self.clock(), f"{address} stopped answering"))
            return
        self.kills.append(Kill(self.clock(), address, pid))
        log.info("killed %s (pid %d)", address, pid)

    # -- the run

    def run(self) -> None:
        self.start = time.monotonic()
        threads = [threading.Thread(target=self.lane, args=(kind,), name=f"chaos-{kind}-{i}", daemon=True)
                   for i, kind in enumerate(self.lanes)]
        for thread in threads:
            thread.start()
        next_kill = self.kill_interval_s
        while self.clock() < self.duration_s:
            time.sleep(0.25)
            self.watch_for_lost()
            if self.clock() >= next_kill and self.clock() < self.duration_s - self.kill_interval_s / 2:
                self.kill_one()
                next_kill += self.kill_interval_s
        self.stopping.set()
        limit = DEADLINE_MS / 1000 + LOST_AFTER_S + 5
        ends = time.monotonic() + limit
        for thread in threads:   # a lane ends once its request does; a hung one is left behind (daemon)
            thread.join(timeout=max(ends - time.monotonic(), 0.1))
            self.watch_for_lost()
        self.wall_s = self.clock()

    def wait_for_restarts(self, timeout_s: float = 300.0) -> None:
        """Wait for every worker to be ready again; note the new pid on each kill's port."""
        self.cluster.wait_ready(timeout_s)
        for kill in self.kills:
            port = self.cluster.ports[self.cluster.addresses.index(kill.address)]
            kill.restarted_pid = self.cluster.worker_pid(port)

    # -- the figures

    def summary(self) -> dict:
        finished = [o for o in self.outcomes if o.status != "running"]
        ok = [o for o in finished if o.status == "ok"]
        e2e = [(o.end_s - o.start_s) * 1000 for o in ok]
        ttft = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
        kill_times = [k.at_s for k in self.kills] + [self.wall_s]
        ok_ends = sorted(o.end_s for o in ok)
        gaps = np.diff([0.0, *ok_ends, self.wall_s]) if ok_ends else [self.wall_s]
        ok_after_kill = [sum(1 for o in ok if a < o.end_s <= b) for a, b in zip(kill_times, kill_times[1:])]
        return {
            "workers": len(self.cluster.ports),
            "lanes": dict(Counter(self.lanes)),
            "duration_s": self.duration_s,
            "wall_s": self.wall_s,
            "distinct_requests": len(self.requests),
            "requests": len(finished),
            "ok": len(ok),
            "failed": sum(1 for o in finished if o.status == "failed"),
            "failed_by_error": dict(Counter(o.error for o in finished if o.status == "failed")),
            "lost": sum(1 for o in finished if o.status == "lost"),
            "lost_why": [o.error for o in finished if o.status == "lost"],
            "still_running": len(self.outcomes) - len(finished),
            "streams_compared": sum(1 for o in finished if o.kind == "stream" and o.status != "lost"),
            "generates_compared": sum(1 for o in finished if o.kind == "generate" and o.status != "lost"),
            "differing_streams": sum(1 for o in finished if o.kind == "stream" and o.differs),
            "differing_generates": sum(1 for o in finished if o.kind == "generate" and o.differs),
            "failed_over": sum(1 for o in ok if o.failed_over_from),
            "kills": len(self.kills),
            "kills_skipped": len(self.skipped_kills),
            "restarted": sum(1 for k in self.kills if k.restarted_pid not in (None, k.pid)),
            "ok_after_each_kill": ok_after_kill,
            "longest_without_ok_s": float(max(gaps)),
            "failure_examples": {o.error: o.detail for o in finished if o.status == "failed"},
            "e2e_ms": percentiles(e2e),
            "ttft_ms": percentiles(ttft),
            "output_tokens_per_s": sum(len(o.tokens) for o in ok) / self.wall_s if self.wall_s else 0.0,
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{p}": float(np.percentile(values, p)) if values else None for p in (50, 99)}


def table(summary: dict) -> str:
    """The run's figures as a markdown table."""
    def ms(value):
        return "-" if value is None else f"{value:,.0f}"

    failed = ", ".join(f"{name} {count}" for name, count in sorted(summary["failed_by_error"].items()))
    lanes = summary["lanes"]
    rows = [
        ("workers (ringlm serve --workers)", summary["workers"]),
        ("concurrent lanes", f"{lanes.get('stream', 0)} streams + {lanes.get('generate', 0)} generates"),
        ("chaos phase (s)", f"{summary['wall_s']:.0f}"),
        ("workers killed with SIGKILL", summary["kills"]),
        ("kills skipped (fewer than 2 workers ready)", summary["kills_skipped"]),
        ("killed workers restarted by the supervisor", summary["restarted"]),
        ("requests", summary["requests"]),
        ("ok", summary["ok"]),
        ("failed (typed error)", f"{summary['failed']}" + (f" ({failed})" if failed else "")),
        ("lost", summary["lost"]),
        ("ok requests that failed over", summary["failed_over"]),
        ("streams compared / differing", f"{summary['streams_compared']} / {summary['differing_streams']}"),
        ("generates compared / differing", f"{summary['generates_compared']} / {summary['differing_generates']}"),
        ("distinct requests / left out for a near-tie", f"{summary['distinct_requests']} / "
                                                         f"{summary.get('screened_near_ties', '-')}"),
        ("fewest ok requests between two kills", min(summary["ok_after_each_kill"], default="-")),
        ("longest time without a request ending ok (s)", f"{summary['longest_without_ok_s']:.1f}"),
        ("end to end p50 / p99 (ms)", f"{ms(summary['e2e_ms']['p50'])} / {ms(summary['e2e_ms']['p99'])}"),
        ("stream TTFT p50 / p99 (ms)", f"{ms(summary['ttft_ms']['p50'])} / {ms(summary['ttft_ms']['p99'])}"),
        ("output tokens/s (ok requests)", f"{summary['output_tokens_per_s']:.0f}"),
    ]
    return "\n".join(["| measure | value |", "|---|---:|", *(f"| {name} | {value} |" for name, value in rows)])


def run_chaos(model: Path | str, folder: Path, *, duration_s: float, kill_interval_s: float = KILL_INTERVAL_S,
              workers: int = WORKERS, distinct: int = DISTINCT_REQUESTS, seed: int = 0,
              flags: tuple[str, ...] = ()) -> tuple[dict, Chaos]:
    """Start the cluster, screen the workload on it undisturbed, run the chaos phase, wait for the
    restarts, stop the cluster; the summary and the run (with every outcome)."""
    with SupervisedCluster(model, folder / "supervisor.log", workers, *flags) as cluster:
        cluster.wait_ready()
        with Client(cluster.addresses) as client:
            requests, screened = screen(client, workload(distinct, seed))
            log.info("%d requests, %d left out for near-ties", len(requests), len(screened))
            chaos = Chaos(cluster, client, requests, duration_s=duration_s, kill_interval_s=kill_interval_s,
                          seed=seed)
            chaos.run()
            chaos.wait_for_restarts()
        summary = chaos.summary()
        summary["screened_near_ties"] = len(screened)
        code = cluster.stop()
        summary["supervisor_exit"] = code
    return summary, chaos


def write_doc_section(path: Path, name: str, body: str) -> None:
    """Replace the `<!-- reliability:NAME -->` section of `path` (appended when missing)."""
    begin, end = f"<!-- reliability:{name} -->", f"<!-- /reliability:{name} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    document = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    document = pattern.sub(lambda _: section, document) if pattern.search(document) else \
        document.rstrip() + "\n\n" + section + "\n"
    path.write_text(document)


def stamp() -> str:
    from benchmarks.run_all import machine
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{datetime.date.today().isoformat()} on {machine()}; load average at the end {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=300.0, help="the chaos phase (default 300)")
    parser.add_argument("--kill-interval-s", type=float, default=KILL_INTERVAL_S)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random two-layer model, the default), "
                                                        "'default' (SmolLM2-135M) or a model path")
    parser.add_argument("--json", type=Path, help="write the figures and every request here")
    parser.add_argument("--doc", type=Path, help="write the table into this file's chaos section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="ringlm-chaos-") as tmp:
        folder = Path(tmp)
        model = write_tiny_model(folder / "tiny-model") if args.model == "tiny" else args.model
        summary, chaos = run_chaos(model, folder, duration_s=args.duration_s, kill_interval_s=args.kill_interval_s)
        summary["model"] = args.model
        log_tail = (folder / "supervisor.log").read_text(errors="replace")
    rendered = table(summary)
    print(rendered)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "kills": [dataclasses.asdict(k) for k in chaos.kills],
                                         "skipped_kills": chaos.skipped_kills,
                                         "outcomes": [dataclasses.asdict(o) for o in chaos.outcomes]}, indent=1))
    if args.doc:
        write_doc_section(args.doc, "chaos", f"Last run: {stamp()}; model `{args.model}`, "
                                             f"`make chaos CHAOS_SECONDS={args.duration_s:g}`.\n\n{rendered}")
    clean = summary["lost"] == 0 and summary["differing_streams"] == 0 and summary["differing_generates"] == 0
    if not clean:
        print(log_tail[-3000:], file=sys.stderr)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
