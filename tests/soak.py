"""Soak: a supervised cluster under steady load for a long time, each worker's resources sampled; none may grow.

`ringlm serve --workers N` (one by default) takes the load-test harness's
closed loop (`ringlm loadtest`: 16 streamed requests in flight through the ring
client, the built-in mix of short and long prompts and multi-turn sessions)
for `duration_s`. Every `interval_s` the sampler reads, for each worker, its
RSS, open file descriptors and threads from /proc (the pid from its `status`)
and its greenlets and open streams from its metrics (`ringlm_greenlets`,
`ringlm_open_streams`). After `warmup_s`, no figure may end more than 5% above
where it started: the median of the last fifth of the samples against the
highest value of the first fifth after the warm-up. The counts move with the
requests in flight at the instant of a sample (0 to 16 streams) and a thread
pool grows and shrinks, so a value within the range seen at the start is no
growth, nor is one busy sample at the end; a leak moves the whole curve.

`python -m tests.soak --duration-s 1800` runs it (`make soak`) and writes the
samples (`--json`), the curves (`--png`) and, with `--doc RELIABILITY.md`, its
table into that file's soak section. `--leak-every-s S` opens a stream every
S seconds on the first worker and neither reads it nor closes its connection:
a leak on purpose, which the check must catch (tests/test_soak.py's smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import SupervisedCluster, connect, write_tiny_model

METRICS = ("rss_bytes", "fds", "threads", "greenlets", "open_streams")
GROWTH_LIMIT = 0.05
WINDOW_SHARE = 0.2        # the first and last fifth of the samples after the warm-up are compared
MIN_WINDOW = 3            # samples per window at least, or the run is too short to judge
CONCURRENCY = 16
MAX_TOKENS = 64
MAX_SEQ_LEN = 512         # the built-in workload's longest chat (~430 tokens) plus its new tokens

log = logging.getLogger("ringlm.soak")


# ------------------------------------------------------------------ sampling

def proc_figures(pid: int) -> dict[str, int]:
    """RSS, open descriptors and threads of a process, from /proc."""
    figures = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "VmRSS":
            figures["rss_bytes"] = int(value.split()[0]) * 1024
        elif name == "Threads":
            figures["threads"] = int(value)
    return figures


def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled samples `ringlm_<name>` from a worker's metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = {}
    for name in names:
        match = re.search(rf"^ringlm_{name} (\S+)$", text, re.MULTILINE)
        if match is None:
            raise LookupError(f"no ringlm_{name} on the metrics page of port {port}")
        found[name] = float(match.group(1))
    return found


def sample(cluster: SupervisedCluster, index: int, at_s: float) -> dict:
    """One worker's figures now; `error` says why some are missing (the worker did not answer)."""
    row = {"t_s": at_s, "worker": cluster.addresses[index]}
    try:
        status = cluster.status(cluster.ports[index], timeout_s=30.0)
        if status is None:
            raise ConnectionError("status did not answer")
        row["pid"] = status.pid
        row.update(proc_figures(status.pid))
        scraped = scrape(cluster.metrics_port + index, ("greenlets", "open_streams", "connections"))
        row.update({name: int(value) for name, value in scraped.items()})
    except (OSError, LookupError, ValueError) as error:
        row["error"] = f"{type(error).__name__}: {error}"
    return row


class Leak:
    """Opens a stream on one worker every `every_s` and keeps it, unread, with its connection open."""

    def __init__(self, port: int, every_s: float):
        self.port, self.every_s = port, every_s
        self.connections = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="soak-leak", daemon=True)

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            try:
                connection = connect(self.port)
                self.connections.append(connection)
                connection.open_stream(thrift.GenerateRequest(prompt="A leak", max_tokens=4, ignore_eos=True))
            except Exception:   # the leak goes on; the check then shows how much of it happened
                log.exception("the leak could not open a stream")

    def __enter__(self) -> Leak:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        for connection in self.connections:
            connection.close()


# ------------------------------------------------------------------ the check

def growth(samples: list[dict], warmup_s: float) -> dict[str, dict[str, dict]]:
    """Per worker and figure: the highest value of the first window after the warm-up, the median of the
    last window, the growth from one to the other (relative to the first, itself at least 1) and whether
    it is within GROWTH_LIMIT. Against the first window's highest value, so that a count moving within
    its range (a thread pool's third or fourth thread, the streams in flight at the instant of a sample)
    is not growth; the last window's median, so that one busy sample is not either: a leak moves the
    whole curve past both. A worker with too few samples after the warm-up gets {"error": ...} instead."""
    report: dict[str, dict] = {}
    for worker in sorted({s["worker"] for s in samples}):
        after = [s for s in samples if s["worker"] == worker and s["t_s"] >= warmup_s]
        missing = [s for s in after if "error" in s]
        window = max(MIN_WINDOW, int(len(after) * WINDOW_SHARE))
        if missing:
            report[worker] = {"error": f"{len(missing)} samples after the warm-up failed: {missing[0]['error']}"}
            continue
        if len({s["pid"] for s in after}) > 1:
            report[worker] = {"error": "the worker restarted during the soak (its pid changed)"}
            continue
        if len(after) < 2 * window:
            report[worker] = {"error": f"{len(after)} samples after the warm-up: too few to compare two "
                                       f"windows of {window}"}
            continue
        report[worker] = {}
        for name in METRICS:
            first = max(s[name] for s in after[:window])
            last = statistics.median(s[name] for s in after[-window:])
            change = (last - first) / max(first, 1)
            report[worker][name] = {"first": first, "last": last, "growth": change,
                                    "ok": change <= GROWTH_LIMIT}
    return report


def failures(report: dict) -> list[str]:
    """What the check failed on, one line each; empty when every worker held steady."""
    lines = []
    for worker, figures in report.items():
        if "error" in figures:
            lines.append(f"{worker}: {figures['error']}")
            continue
        lines += [f"{worker}: {name} grew {figure['growth']:+.1%} ({figure['first']:g} -> {figure['last']:g})"
                  for name, figure in figures.items() if not figure["ok"]]
    return lines


# ------------------------------------------------------------------ the run

def run_soak(model: Path | str, folder: Path, *, duration_s: float, interval_s: float = 10.0,
             warmup_s: float | None = None, workers: int = 1, concurrency: int = CONCURRENCY,
             max_tokens: int = MAX_TOKENS, leak_every_s: float | None = None) -> dict:
    """Start the cluster, run the load and sample until it ends, stop the cluster; the report."""
    warmup_s = duration_s / 6 if warmup_s is None else warmup_s
    with SupervisedCluster(model, folder / "supervisor.log", workers, "--max-seq-len", str(MAX_SEQ_LEN),
                           metrics=True) as cluster:
        cluster.wait_ready()
        load_json = folder / "load.json"
        with open(folder / "loadtest.log", "wb") as load_log:
            load = subprocess.Popen(
                [sys.executable, "-m", "ringlm.cli", "loadtest", "--servers", ",".join(cluster.addresses),
                 "--concurrency", str(concurrency), "--duration", str(duration_s), "--max-tokens",
                 str(max_tokens), "--json", str(load_json), "--no-progress"], stdout=load_log,
                stderr=subprocess.STDOUT)
        samples = []
        start = time.monotonic()
        with Leak(cluster.ports[0], leak_every_s) if leak_every_s else contextlib.nullcontext():
            tick = 0
            while load.poll() is None and tick * interval_s <= duration_s:
                time.sleep(max(start + tick * interval_s - time.monotonic(), 0))   # the sampling cadence
                at_s = time.monotonic() - start
                for index in range(len(cluster.ports)):
                    samples.append(sample(cluster, index, at_s))
                    log.info("%.0f s %s", at_s, " ".join(f"{k}={v}" for k, v in samples[-1].items() if k != "t_s"))
                tick += 1
        try:
            load.wait(timeout=600)   # it stops starting requests at duration_s; the last ones finish
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
        if load.returncode != 0 or not load_json.exists():
            raise AssertionError(f"the load test exited with {load.returncode}:\n"
                                 f"{(folder / 'loadtest.log').read_text(errors='replace')[-3000:]}")
        supervisor_exit = cluster.stop()
    load_summary = json.loads(load_json.read_text())
    report = growth(samples, warmup_s)
    return {
        "config": {"duration_s": duration_s, "interval_s": interval_s, "warmup_s": warmup_s, "workers": workers,
                   "concurrency": concurrency, "max_tokens": max_tokens, "leak_every_s": leak_every_s,
                   "model": str(model), "growth_limit": GROWTH_LIMIT},
        "samples": samples,
        "growth": report,
        "failures": failures(report),
        "load": {key: value for key, value in load_summary.items() if key != "samples"},
        "load_samples": load_summary["samples"],
        "supervisor_exit": supervisor_exit,
    }


# ------------------------------------------------------------------ reporting

UNITS = {"rss_bytes": ("RSS (MiB)", 1 / 2**20), "fds": ("open file descriptors", 1), "threads": ("threads", 1),
         "greenlets": ("greenlets", 1), "open_streams": ("open streams", 1)}


def table(result: dict) -> str:
    """The run's figures as a markdown table: the load held, then each worker's figures and growth."""
    load, config = result["load"], result["config"]
    failed = ", ".join(f"{name} {count}" for name, count in sorted(load["outcomes"].items())
                       if name not in ("stop", "length"))
    lines = ["| measure | value |", "|---|---:|",
             f"| load | {config['concurrency']} streams in flight, {config['max_tokens']} new tokens each, "
             f"{load['wall_s'] / 60:.1f} min |",
             f"| requests ok | {load['requests_ok']} |",
             f"| requests failed | {load['requests_failed']}{f' ({failed})' if failed else ''} |",
             f"| output tokens/s | {load['output_tokens_per_s']:.0f} |",
             f"| end to end p99 (ms) | {load['e2e_ms']['p99'] or 0:,.0f} |",
             f"| samples (every {config['interval_s']:g} s, warm-up {config['warmup_s']:g} s) | "
             f"{len(result['samples'])} |"]
    for worker, figures in result["growth"].items():
        if "error" in figures:
            lines.append(f"| {worker} | {figures['error']} |")
            continue
        for name, figure in figures.items():
            label, scale = UNITS[name]
            lines.append(f"| {worker} {label}: start (highest) -> end (median) | {figure['first'] * scale:,.1f} -> "
                         f"{figure['last'] * scale:,.1f} ({figure['growth']:+.1%}) |")
    verdict = "none grew more than 5%" if not result["failures"] else "; ".join(result["failures"])
    lines.append(f"| verdict | {verdict} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Each figure over time, one line per worker, the warm-up shaded; the load's tokens/s underneath."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samples, warmup_s = result["samples"], result["config"]["warmup_s"]
    figure, axes = plt.subplots(len(METRICS) + 1, 1, figsize=(9, 2.1 * (len(METRICS) + 1)), sharex=True)
    for axis, name in zip(axes, METRICS):
        label, scale = UNITS[name]
        for worker in sorted({s["worker"] for s in samples}):
            rows = [s for s in samples if s["worker"] == worker and name in s]
            axis.plot([s["t_s"] / 60 for s in rows], [s[name] * scale for s in rows], marker=".", label=worker)
        axis.axvspan(0, warmup_s / 60, color="0.9")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
    axes[0].legend(loc="lower right", fontsize="small")
    times = [t for s in result["load_samples"] if s["ok"] for t in s["token_times_s"]]
    if times:
        bins = np.arange(0, max(times) + 10, 10)
        counts, edges = np.histogram(times, bins=bins)
        axes[-1].step(edges[:-1] / 60, counts / 10, where="post")
    axes[-1].axvspan(0, warmup_s / 60, color="0.9")
    axes[-1].set_ylabel("output tokens/s")
    axes[-1].set_xlabel("minutes (warm-up shaded)")
    verdict = "steady" if not result["failures"] else "GREW: " + "; ".join(result["failures"])[:120]
    figure.suptitle(f"soak: {result['load']['requests_ok']} requests ok, {verdict}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="how long the load runs (default 1800)")
    parser.add_argument("--interval-s", type=float, default=10.0, help="between samples (default 10)")
    parser.add_argument("--warmup-s", type=float, help="samples before this are not judged (default a sixth)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random two-layer model, the default), "
                                                        "'default' (SmolLM2-135M) or a model path")
    parser.add_argument("--leak-every-s", type=float, help="leak a stream every S seconds (the check's self-test)")
    parser.add_argument("--json", type=Path, help="write the samples and the report here")
    parser.add_argument("--png", type=Path, help="draw the curves here")
    parser.add_argument("--doc", type=Path, help="write the table into this file's soak section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="ringlm-soak-") as tmp:
        folder = Path(tmp)
        model = write_tiny_model(folder / "tiny-model") if args.model == "tiny" else args.model
        result = run_soak(model, folder, duration_s=args.duration_s, interval_s=args.interval_s,
                          warmup_s=args.warmup_s, workers=args.workers, concurrency=args.concurrency,
                          leak_every_s=args.leak_every_s)
    result["config"]["model"] = args.model
    rendered = table(result)
    print(rendered)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.png)
    if args.doc:
        from tests.chaos import stamp, write_doc_section
        picture = f"\n\n![the soak's curves]({args.png})" if args.png else ""
        write_doc_section(args.doc, "soak", f"Last run: {stamp()}; model `{args.model}`, "
                                            f"`make soak SOAK_SECONDS={args.duration_s:g}`.\n\n{rendered}{picture}")
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
