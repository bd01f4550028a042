"""RPC round trips: `tokenize` of a short text over loopback, a ringlm worker against a minimal grpcio service, one run.

Both servers tokenize with the same ringlm Tokenizer (SmolLM2's vocabulary) in
their own process pinned to one core; the client runs in this process on
another core and makes one call at a time over one connection, so calls/s is
the inverse of the mean round trip. The gRPC service is the least gRPC can do:
a generic handler whose request is the UTF-8 text and whose reply is the ids
packed as int32, with no protobuf in the way; the ringlm side is the real
worker (Thrift binary protocol, framed, frame checks, handler validation).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from array import array
from concurrent import futures

TEXT = "The quick brown fox jumps over the lazy dog."
WARMUP = 500
CALLS = 5000
GRPC_METHOD = "/ringlm.bench.Tokenizer/Tokenize"
SERVER_CORE = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin(pid: int, core: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(pid, {cores[core % len(cores)]})


def wait_for(call, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
            return
        except Exception:   # not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the benchmark server did not start (exit code {process.poll()})") from None
            time.sleep(0.2)


# -- the gRPC side

def serve_grpc(port: int) -> None:
    """The gRPC server process: one generic unary method, ids packed as int32."""
    import grpc

    from ringlm.ext.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model("default")

    def tokenize(request: bytes, context) -> bytes:
        return array("i", tokenizer.encode(request.decode("utf-8"))).tobytes()

    handler = grpc.method_handlers_generic_handler("ringlm.bench.Tokenizer", {
        "Tokenize": grpc.unary_unary_rpc_method_handler(tokenize)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def grpc_client(port: int):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(GRPC_METHOD)
    return lambda: array("i", call(TEXT.encode("utf-8"), timeout=10)).tolist(), channel.close


# -- the ringlm side

def thrift_client(port: int):
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TCyFramedTransportFactory

    from ringlm.idl import ringlm_thrift

    client = make_client(ringlm_thrift.Generator, "127.0.0.1", port, proto_factory=TCyBinaryProtocolFactory(),
                         trans_factory=TCyFramedTransportFactory(), timeout=10_000)
    return lambda: client.tokenize(TEXT, False, True), client.close


def start(argv: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pin(process.pid, SERVER_CORE)
    return process


def one_call(make_client, port: int) -> None:
    call, close = make_client(port)
    try:
        call()
    finally:
        close()


def measure(make_client, port: int, process: subprocess.Popen) -> dict:
    wait_for(lambda: one_call(make_client, port), process)
    call, close = make_client(port)
    expected = call()
    for _ in range(WARMUP):
        call()
    times = []
    started = time.perf_counter()
    for _ in range(CALLS):
        begin = time.perf_counter_ns()
        ids = call()
        times.append(time.perf_counter_ns() - begin)
    elapsed = time.perf_counter() - started
    close()
    assert ids == expected
    times.sort()
    return {"p50_us": times[len(times) // 2] / 1000, "p99_us": times[int(len(times) * 0.99)] / 1000,
            "calls_per_s": CALLS / elapsed, "ids": expected}


def run_both() -> dict[str, dict]:
    pin(os.getpid(), SERVER_CORE + 1)
    results = {}
    servers = {
        "ringlm (thriftpy2 Cython binary, framed, gevent)": (
            [sys.executable, "-m", "ringlm.server.worker", "--model", "default", "--torch-threads", "1"],
            thrift_client),
        "grpcio (generic handler, raw bytes)": ([sys.executable, __file__, "--grpc-server"], grpc_client),
    }
    for name, (argv, make_client) in servers.items():
        port = free_port()
        process = start([*argv, "--port", str(port)])
        try:
            results[name] = measure(make_client, port, process)
        finally:
            process.terminate()
            process.wait(timeout=60)
    ids = [r.pop("ids") for r in results.values()]
    assert ids[0] == ids[1], "the two servers tokenized differently"
    return results


def table(results: dict[str, dict]) -> str:
    grpc_rate = next(r["calls_per_s"] for name, r in results.items() if name.startswith("grpcio"))
    lines = ["| server | p50 (µs) | p99 (µs) | calls/s | vs grpcio |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['calls_per_s']:,.0f} | "
                     f"{r['calls_per_s'] / grpc_rate:.2f}x |")
    return "\n".join(lines)


def main() -> str:
    results = run_both()
    text = (f"`tokenize` of a {len(TEXT)}-character text over loopback, {CALLS} sequential calls on one "
            f"connection after {WARMUP} warm-up calls; each server process pinned to one core, the client "
            f"to another.\n\n" + table(results))
    print(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-server", action="store_true", help="run the gRPC side (used by main)")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.grpc_server:
        serve_grpc(args.port)
    else:
        main()
