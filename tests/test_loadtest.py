"""The load-test harness: percentiles, the JSON report, plots, workloads, and runs against a real OpenAI-style stub."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ringlm.client.loadtest import (RequestSpec, Sample, builtin_workload, jsonl_workload, parse_priority_mix,
                                   percentiles, plot, render_table, run_load, summarize, with_priorities)
from ringlm.client.targets import OpenAITarget


def test_percentiles_from_known_samples():
    values = list(range(1, 101))   # 1..100
    assert percentiles(values) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def sample(start, ttft, step, tokens, ok=True, outcome="length", cached=0, prompt=10) -> Sample:
    times = [start + ttft + i * step for i in range(tokens)]
    return Sample(start_s=start, end_s=(times[-1] if times else start) + 0.01, ok=ok, outcome=outcome,
                  output_tokens=tokens, prompt_tokens=prompt, cached_prompt_tokens=cached, token_times_s=times)


def test_summary_has_the_schema_and_the_right_numbers():
    samples = [sample(0.0, 0.1, 0.02, 11), sample(0.5, 0.3, 0.04, 6, cached=5),
               sample(1.0, 0.0, 0.0, 0, ok=False, outcome="OverloadedError")]
    summary = summarize(samples, wall_s=2.0, target="test")
    for key in ("requests_ok", "requests_failed", "output_tokens_per_s", "requests_per_s",
                "ttft_ms", "tpot_ms", "e2e_ms", "samples"):
        assert key in summary
    assert (summary["requests_ok"], summary["requests_failed"]) == (2, 1)
    assert summary["outcomes"] == {"length": 2, "OverloadedError": 1}
    assert summary["output_tokens_per_s"] == pytest.approx(17 / 2.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(np.percentile([100.0, 300.0], 50))
    assert summary["tpot_ms"]["p99"] == pytest.approx(np.percentile([20.0, 40.0], 99))
    assert summary["prefix_cache_hit_rate"] == pytest.approx(5 / 20)
    assert len(summary["samples"]) == 3 and json.loads(json.dumps(summary)) == summary
    text = render_table([summary, summary], ["a", "b"])
    assert "OverloadedError" in text and "ttft p50 (ms)" in text


def test_plot_writes_a_png(tmp_path):
    summary = summarize([sample(i * 0.1, 0.05, 0.01, 20) for i in range(30)], 3.5, "test")
    path = tmp_path / "load.png"
    plot(summary, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workloads_and_priority_mix(tmp_path):
    specs = [next(s) for s in [builtin_workload(16)] for _ in range(200)]
    assert any(s.session for s in specs) and any(s.prompt and len(s.prompt) > 500 for s in specs)
    sessions = [s for s in specs if s.session]
    assert any(len(s.messages) > 2 for s in sessions)   # later turns extend earlier ones
    mixed = with_priorities(iter(specs), parse_priority_mix("high=1,low=1"))
    assert {s.priority for s in mixed} == {"high", "low"}
    with pytest.raises(ValueError, match="bad priority"):
        parse_priority_mix("urgent=1")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}], "session": "s"}\n')
    loaded = jsonl_workload(path, 8)
    assert [next(loaded).prompt, next(loaded).session, next(loaded).prompt] == ["hi", "s", "hi"]
    path.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        jsonl_workload(path, 8)


# ---------------------------------------------------------------- a minimal OpenAI-compatible server

TOKENS_PER_REPLY = 5


class StubHandler(BaseHTTPRequestHandler):
    """Streams TOKENS_PER_REPLY one-word deltas for any chat or completion request."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("max_tokens", 0) > 1000:
            self.send_response(400)
            self.end_headers()
            return
        chat = self.path.endswith("/chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(TOKENS_PER_REPLY):
            choice = {"delta": {"content": f"w{i} "}} if chat else {"text": f"w{i} "}
            if i == TOKENS_PER_REPLY - 1:
                choice["finish_reason"] = "length"
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": 7, "completion_tokens": TOKENS_PER_REPLY}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_bad_harness_arguments_are_refused():
    specs = builtin_workload(4)
    with pytest.raises(ValueError, match="exactly one of concurrency"):
        run_load(None, specs, concurrency=2, rate=1.0, requests=1)
    with pytest.raises(ValueError, match="exactly one of concurrency"):
        run_load(None, specs, requests=1)
    with pytest.raises(ValueError, match="request count, a duration"):
        run_load(None, specs, concurrency=1)
    with pytest.raises(ValueError, match="http"):
        OpenAITarget("ftp://example/v1")


def test_run_load_against_the_stub_in_process(stub_url):
    target = OpenAITarget(stub_url)
    specs = iter([RequestSpec(prompt="a", max_tokens=5), RequestSpec(messages=[{"role": "user", "content": "b"}]),
                  RequestSpec(prompt="too long", max_tokens=5000)] * 3)
    samples, wall = run_load(target, specs, concurrency=2, requests=9)
    summary = summarize(samples, wall, target.name)
    assert (summary["requests_ok"], summary["requests_failed"]) == (6, 3)
    assert summary["outcomes"]["OpenAIError"] == 3
    assert all(s["output_tokens"] == TOKENS_PER_REPLY and s["prompt_tokens"] == 7
               for s in summary["samples"] if s["ok"])


def test_loadtest_command_against_the_stub(stub_url, tmp_path):
    report, picture = tmp_path / "report.json", tmp_path / "report.png"
    run = subprocess.run([sys.executable, "-m", "ringlm.cli", "loadtest", "--openai-url", stub_url,
                          "--rate", "50", "--requests", "20", "--max-tokens", "5", "--json", str(report),
                          "--plot", str(picture), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(report.read_text())
    assert summary["requests_ok"] == 20 and summary["output_tokens_per_s"] > 0
    assert len(summary["samples"]) == 20 and picture.read_bytes()[:4] == b"\x89PNG"
    assert "output tokens/s" in run.stdout
    compare = subprocess.run([sys.executable, "-m", "ringlm.cli", "loadtest", "--compare", str(report), str(report)],
                             capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0 and compare.stdout.count("report.json") == 2


def test_loadtest_command_against_a_local_cluster(tmp_path_factory, tmp_path):
    """A few seconds of closed-loop load on a real worker (tiny model), through the ring client."""
    from tests.server_helpers import running_worker, tiny_model_folder

    report, prompts = tmp_path / "cluster.json", tmp_path / "prompts.jsonl"
    system = {"role": "system", "content": "You answer questions about hash rings briefly."}
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "What is a hash ring?"},
        {"messages": [system, {"role": "user", "content": "Why bound loads?"}], "session": "a"},
        {"messages": [system, {"role": "user", "content": "What moves when a node joins?"}], "session": "b"}]))
    with running_worker(tiny_model_folder(tmp_path_factory), tmp_path / "worker.log") as worker:
        run = subprocess.run([sys.executable, "-m", "ringlm.cli", "loadtest", "--servers", f"127.0.0.1:{worker.port}",
                              "--concurrency", "4", "--duration", "3", "--max-tokens", "8", "--prompts", str(prompts),
                              "--priority-mix", "high=1,low=1", "--json", str(report), "--no-progress"],
                             capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    summary = json.loads(report.read_text())
    assert summary["requests_ok"] > 4 and summary["requests_failed"] == 0
    assert all(s["output_tokens"] == 8 for s in summary["samples"])   # EOS is ignored under load
    assert {s["priority"] for s in summary["samples"]} == {"high", "low"}
    assert summary["prefix_cache_hit_rate"] > 0   # repeated prompts and a shared system prompt
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
