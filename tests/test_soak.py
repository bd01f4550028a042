"""Soak: the growth check on made-up samples, and a short run of tests/soak.py (`make soak` runs the long one)
that must show its sampler reading every figure of a live worker and its check catching a leak made on
purpose (a stream opened every second and a half, never read, its connection kept open)."""

from __future__ import annotations

import json

import pytest

from tests.server_helpers import tiny_model_folder
from tests.soak import METRICS, failures, growth, plot, run_soak, table

STEADY = {"pid": 1, "rss_bytes": 300 << 20, "fds": 40, "threads": 9, "greenlets": 30, "open_streams": 16}


def samples(count: int, change=lambda name, i: 0, worker: str = "w:1") -> list[dict]:
    return [{"t_s": 10.0 * i, "worker": worker, **{name: value + change(name, i) if name != "pid" else value
                                                  for name, value in STEADY.items()}} for i in range(count)]


def test_steady_figures_pass_whatever_the_warm_up_did_and_however_the_load_jitters():
    warm_up = lambda name, i: -(STEADY[name] // 2) if i < 6 else 0     # grew to its level in the warm-up
    flicker = {"open_streams": lambda i: -4 * (i % 3 == 0),             # fewer in flight at some instants
               "threads": lambda i: (i % 5 == 1) + (i > 30) * (i % 2)}   # a pool's extra thread, more often late
    jitter = lambda name, i: warm_up(name, i) + flicker.get(name, lambda i: 0)(i)
    report = growth(samples(40, jitter), warmup_s=60)
    assert not failures(report)
    assert set(report["w:1"]) == set(METRICS)


@pytest.mark.parametrize("name", METRICS)
def test_a_figure_growing_more_than_five_percent_after_the_warm_up_fails(name):
    leak = lambda metric, i: int(STEADY[name] * 0.004 * i) if metric == name else 0   # +16% over 40 samples
    problems = failures(growth(samples(40, leak), warmup_s=60))
    assert len(problems) == 1 and problems[0].startswith(f"w:1: {name} grew +")


def test_too_short_a_run_or_a_restarted_worker_cannot_pass():
    assert "too few" in failures(growth(samples(8), warmup_s=60))[0]
    restarted = samples(40)
    for row in restarted[30:]:
        row["pid"] = 2
    assert "restarted" in failures(growth(restarted, warmup_s=60))[0]


def test_a_short_soak_samples_every_figure_and_catches_a_leak(tmp_path_factory, tmp_path):
    model = tiny_model_folder(tmp_path_factory)
    result = run_soak(model, tmp_path, duration_s=50, interval_s=2, warmup_s=16, leak_every_s=1.5)
    print(table(result))
    rows = result["samples"]
    assert len(rows) >= 15 and not any("error" in row for row in rows)
    assert all(row["rss_bytes"] > 50 << 20 and row["fds"] > 3 and row["threads"] >= 2 and row["greenlets"] >= 2
               for row in rows)
    assert max(row["open_streams"] for row in rows) > 16   # the load's 16 and the leaked ones
    assert result["load"]["requests_ok"] > 0 and result["supervisor_exit"] == 0
    grew = {line.split()[1] for line in result["failures"]}
    assert {"open_streams", "greenlets", "fds"} <= grew, result["failures"]
    plot(result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result)   # what --json writes
