"""End to end: one ringlm server vs a naive Flask + transformers server (and llama.cpp's llama-server if given).

The default model on this machine, ~64-token prompts, 64 new tokens (end of
sequence ignored), greedy, at 1, 8 and 32 concurrent streams, each measured
with `ringlm loadtest` (the same harness and client code path for all). The
naive server runs one request at a time and answers when done, like a classic
/predict service. Set LLAMA_SERVER to a llama-server binary to add llama.cpp
(16 parallel slots, continuous batching, flash attention) on the same GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CONCURRENCY = (1, 8, 32)
NEW_TOKENS = 64
PROMPT_TOKENS = 64
READY_TIMEOUT_S = 600.0
PLOT = Path(__file__).resolve().parent / "e2e.png"
LOADTEST_PLOT = Path(__file__).resolve().parent / "loadtest-ringlm-32.png"   # shown in the README
TOPICS = ["hash rings", "KV caches", "gevent", "Thrift", "tokenizers", "sampling", "ZooKeeper", "batching"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prompts_file(folder: Path) -> Path:
    """Distinct prompts cut to PROMPT_TOKENS tokens of the model's tokenizer."""
    from ringlm.ext.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_model("default")
    lines = []
    for i, topic in enumerate(TOPICS * 8):
        text = (f"Request {i}. Explain {topic} to a new engineer on the team, with an example, the usual "
                f"pitfalls, how to measure it, and what to read next. ") * 4
        lines.append(json.dumps({"prompt": tokenizer.decode(tokenizer.encode(text)[:PROMPT_TOKENS])}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines))
    return path


def wait_http(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer (exit code {process.poll()})")


def start_ringlm(port: int) -> tuple[subprocess.Popen, list[str]]:
    from ringlm.server.cluster import wait_until_healthy
    process = subprocess.Popen([sys.executable, "-m", "ringlm.server.worker", "--model", "default", "--port",
                                str(port), "--num-slots", "32", "--max-seq-len", "256", "--torch-threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_until_healthy([("127.0.0.1", port)], READY_TIMEOUT_S, stopping=lambda: process.poll() is not None):
        raise RuntimeError("the ringlm server did not come up")
    return process, ["--servers", f"127.0.0.1:{port}"]


def start_naive(port: int) -> tuple[subprocess.Popen, list[str]]:
    script = Path(__file__).resolve().parent / "naive_server.py"
    process = subprocess.Popen([sys.executable, str(script), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", process)
    return process, ["--openai-url", f"http://127.0.0.1:{port}/v1"]


def start_llama_server(port: int) -> tuple[subprocess.Popen, list[str]]:
    from ringlm.ext.model_files import default_model_path
    process = subprocess.Popen([os.environ["LLAMA_SERVER"], "-m", str(default_model_path()), "--port", str(port),
                                "-np", "16", "-c", str(16 * 256), "-t", str(os.cpu_count()), "-fa", "on",
                                "--cont-batching"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", process)
    return process, ["--openai-url", f"http://127.0.0.1:{port}/v1"]


def loadtest(target: list[str], concurrency: int, requests: int, prompts: Path, folder: Path) -> dict:
    report = folder / f"report-{time.monotonic_ns()}.json"
    subprocess.run([sys.executable, "-m", "ringlm.cli", "loadtest", *target, "--concurrency", str(concurrency),
                    "--requests", str(requests), "--max-tokens", str(NEW_TOKENS), "--prompts", str(prompts),
                    "--json", str(report), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def measure(name: str, start, requests_for, prompts: Path, folder: Path) -> dict[int, dict]:
    process, target = start(free_port())
    try:
        loadtest(target, 1, 1, prompts, folder)   # warm-up
        return {c: loadtest(target, c, requests_for(c), prompts, folder) for c in CONCURRENCY}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def plot(results: dict[str, dict[int, dict]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_concurrency in results.items():
        levels = sorted(by_concurrency)
        throughput.plot(levels, [by_concurrency[c]["output_tokens_per_s"] for c in levels], marker="o", label=name)
        ttft.plot(levels, [by_concurrency[c]["ttft_ms"]["p50"] for c in levels], marker="o", label=name)
    throughput.set(xlabel="concurrent streams", ylabel="output tokens/s", xscale="log", title="Throughput")
    ttft.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", yscale="log", title="Time to first token")
    throughput.legend()
    figure.tight_layout()
    figure.savefig(PLOT, dpi=100)
    plt.close(figure)


def table(results: dict[str, dict[int, dict]]) -> str:
    names = list(results)
    header = ("| concurrency | " + " | ".join(f"{n} tokens/s" for n in names) + " | "
              + " | ".join(f"{n} TTFT p50 ms" for n in names) + " | ringlm / naive tokens/s |")
    lines = [header, "|" + "---:|" * (2 * len(names) + 2)]
    for c in CONCURRENCY:
        rates = [results[n][c]["output_tokens_per_s"] for n in names]
        ttfts = [results[n][c]["ttft_ms"]["p50"] for n in names]
        ratio = results["ringlm"][c]["output_tokens_per_s"] / max(results["naive"][c]["output_tokens_per_s"], 1e-9)
        lines.append(f"| {c} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                     + " | ".join(f"{t:.0f}" for t in ttfts) + f" | {ratio:.1f}x |")
    return "\n".join(lines)


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = prompts_file(folder)
        results = {"ringlm": measure("ringlm", start_ringlm, lambda c: max(4, 2 * c), prompts, folder),
                   "naive": measure("naive", start_naive, lambda c: max(2, c), prompts, folder)}
        llama = os.environ.get("LLAMA_SERVER")
        if llama and shutil.which(llama):
            results["llama-server"] = measure("llama-server", start_llama_server, lambda c: max(4, 2 * c),
                                              prompts, folder)
            note = f"llama.cpp: {llama}."
        else:
            note = "llama.cpp's llama-server: skipped (set LLAMA_SERVER to its binary to include it)."
    plot(results)
    from ringlm.client.loadtest import plot as plot_run
    plot_run(results["ringlm"][32], LOADTEST_PLOT)
    text = (f"Default model (SmolLM2-135M-Instruct, float32, 1 torch thread), {PROMPT_TOKENS}-token prompts, "
            f"{NEW_TOKENS} new tokens, greedy; ringlm: 1 worker, 32 slots. {note}\n\n{table(results)}\n\n"
            f"![end-to-end throughput and TTFT](benchmarks/{PLOT.name})")
    print(text)
    return text


if __name__ == "__main__":
    main()
