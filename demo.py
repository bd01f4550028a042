"""The main job (`make demo`): the tokenizer at work, then a local cluster, a chat over it and a small load test.

Starts `ringlm cluster` with the default model on free ports as a real child
process, talks to it through the consistent-hash client, runs
`ringlm loadtest` against it, and stops it with SIGTERM (a drain), so every
piece a user would touch is exercised end to end.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

DEMO_TEXT = "ringlm serves SmolLM2 over Thrift: 12 workers, 3 rings, naïve café ☕ in 0.5 s."
SERVERS = 2
CHAT = ["What is the capital of France?", "And what river runs through it?"]


def show_tokenizer(model: str) -> bool:
    from ringlm.ext.tokenizer import Tokenizer
    from ringlm.ext.model_files import resolve_model_path

    tokenizer = Tokenizer.from_model(model)
    print(f"model      {resolve_model_path(model)}")
    print(f"vocabulary {tokenizer.vocab_size} tokens, bos={tokenizer.bos_id}, eos={tokenizer.eos_id}")
    ids = tokenizer.encode(DEMO_TEXT)
    print(f"text       {DEMO_TEXT}")
    print(f"ids        {ids}")
    print(f"pieces     {[tokenizer.token_bytes(i).decode('utf-8', 'backslashreplace') for i in ids]}")
    decoded = tokenizer.decode(ids)
    print(f"decoded    {decoded}")
    return decoded == DEMO_TEXT


def free_base_port(count: int) -> int:
    """A port P such that P..P+count-1 are free now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65536 and all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_cluster(model: str, base: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ringlm.cli", "cluster", "--count", str(SERVERS), "--model", model,
            "--base-port", str(base), "--num-slots", "8", "--max-seq-len", "1024", "--torch-threads", "1"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def chat(servers: list[str]) -> None:
    from ringlm.client import Client

    messages = []
    with Client(servers) as client:
        for question in CHAT:
            messages.append({"role": "user", "content": question})
            result = client.generate(messages=messages, session="demo-chat", max_tokens=48)
            messages.append({"role": "assistant", "content": result.text})
            print(f"user       {question}")
            print(f"assistant  {result.text.strip()}")
            print(f"           [{result.server}, {result.usage.prompt_tokens} prompt tokens of which "
                  f"{result.usage.cached_prompt_tokens} cached, {result.usage.completion_tokens} new, "
                  f"ttft {result.timings.ttft_ms:.0f} ms]")


def loadtest(servers: list[str]) -> int:
    argv = [sys.executable, "-m", "ringlm.cli", "loadtest", "--servers", ",".join(servers), "--concurrency", "8",
            "--requests", "24", "--max-tokens", "32", "--no-progress"]
    return subprocess.run(argv).returncode


def main(model: str = "default") -> int:
    from ringlm.server.cluster import wait_until_healthy

    if not show_tokenizer(model):
        print("error: decode(encode(text)) differs from the text", file=sys.stderr)
        return 1
    base = free_base_port(SERVERS)
    servers = [f"127.0.0.1:{base + i}" for i in range(SERVERS)]
    print(f"\nstarting a cluster of {SERVERS} servers: {', '.join(servers)}", flush=True)
    started = time.monotonic()
    cluster = start_cluster(model, base)
    try:
        if not wait_until_healthy([("127.0.0.1", base + i) for i in range(SERVERS)],
                                  stopping=lambda: cluster.poll() is not None):
            print("error: the cluster did not come up", file=sys.stderr)
            return 1
        print(f"ready in {time.monotonic() - started:.1f} s\n", flush=True)
        chat(servers)
        print("\nload test: 24 requests, 8 at a time, 32 new tokens each", flush=True)
        return loadtest(servers)
    finally:
        cluster.send_signal(signal.SIGINT)
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
        print(f"\ncluster stopped (exit {cluster.returncode})")


if __name__ == "__main__":
    sys.exit(main())
