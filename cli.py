"""The `ringlm` command line: one subcommand per job (tokenize, detokenize, demo, serve, status, cluster, generate, chat, loadtest)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

def load_tokenizer(model: str):
    from ringlm.ext.tokenizer import Tokenizer
    return Tokenizer.from_model(model)


def read_argument_or_stdin(values: list[str]) -> str:
    if not values or values == ["-"]:
        return sys.stdin.read()
    return " ".join(values)


def parse_ids(text: str) -> list[int]:
    """Token ids written as a JSON list or separated by spaces/commas."""
    text = text.strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"token ids must be integers (a JSON list or space separated), got {text[:60]!r}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("token ids must be a list of integers")
    return ids


def command_tokenize(args) -> int:
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(read_argument_or_stdin(args.text), parse_special=not args.plain)
    print(json.dumps(ids))
    return 0


def command_detokenize(args) -> int:
    tokenizer = load_tokenizer(args.model)
    text = tokenizer.decode(parse_ids(read_argument_or_stdin(args.ids)),
                            skip_special_tokens=args.skip_special)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def command_demo(args) -> int:
    from ringlm.demo import main as demo
    return demo(args.model)

def command_serve(args) -> int:
    from ringlm.server.config import config_from_args
    from ringlm.server.supervisor import serve
    return serve(config_from_args(args), args.workers)


def process_count(text: str) -> int:
    """An argparse type: how many server processes to start, at least one."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def command_status(args) -> int:
    """Each server's status as a JSON line, asked directly (not through a ring); exit 1 if one failed."""
    from ringlm.client.address import parse_server_list
    from ringlm.client.auth import read_token_file
    from ringlm.client.probe import probe
    from ringlm.idl import to_dict

    addresses = parse_server_list(args.servers)
    token = read_token_file(args.auth_token_file)
    tls = tls_from_arguments(args)
    unreachable = 0
    for address in addresses:
        try:
            status = probe(address, "status", timeout_s=args.timeout, auth_token=token, ssl_context=tls)
            report = {"server": address, "ok": True, "status": to_dict(status)}
        except Exception as error:   # any failure means this server cannot be used: report it, go on
            unreachable += 1
            report = {"server": address, "ok": False, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(report), flush=True)
    return 1 if unreachable else 0


def cluster_client(args):
    """A Client over --servers or --zookeeper (the cluster commands' common options)."""
    from ringlm.client import Client
    from ringlm.client.auth import read_token_file
    from ringlm.client.discovery import ZooKeeperDiscovery

    settings = {"auth_token": read_token_file(args.auth_token_file), "ssl_context": tls_from_arguments(args)}
    networks = args.zookeeper_allowed_networks
    if not args.zookeeper:
        if args.zookeeper_auth_file or networks is not None:
            raise ValueError("--zookeeper-auth-file and --zookeeper-allowed-networks go with --zookeeper")
        return Client(args.servers, **settings)
    discovery = ZooKeeperDiscovery(args.zookeeper, credentials=read_token_file(args.zookeeper_auth_file),
                                   allowed_networks=None if networks is None else networks.split(","))
    return Client(discovery=discovery, **settings)


def generation_options(args) -> dict:
    """generate()'s keyword arguments from the sampling flags (greedy when none is given)."""
    options = {"max_tokens": args.max_tokens, "priority": args.priority, "seed": args.seed,
               "deadline_ms": args.deadline_ms, "temperature": args.temperature, "top_k": args.top_k,
               "top_p": args.top_p}
    return {name: value for name, value in options.items() if value is not None}


def command_generate(args) -> int:
    from ringlm.client import RinglmError

    text = read_argument_or_stdin(args.prompt)
    prompt = {"messages": [{"role": "user", "content": text}]} if args.chat else {"prompt": text}
    with cluster_client(args) as client:
        try:
            if not args.stream:
                result = client.generate(**prompt, session=args.session, **generation_options(args))
                print(json.dumps(result.to_dict()) if args.json else result.text)
                return 0
            stream = client.stream(**prompt, session=args.session, **generation_options(args))
            for chunk in stream:
                print(json.dumps({"text": chunk}) if args.json else chunk, end="\n" if args.json else "", flush=True)
            print(json.dumps({"result": stream.result.to_dict()}) if args.json else "")
            return 0
        except ValueError:
            raise   # a bad request: main reports it
        except RinglmError as error:
            print(f"ringlm generate: error: {error}", file=sys.stderr)
            return 1


def command_chat(args) -> int:
    """Read a user turn per line, stream each reply; the whole conversation keeps one session (one server)."""
    import uuid

    from ringlm.client import RinglmError

    session = args.session or f"chat-{uuid.uuid4().hex}"
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    with cluster_client(args) as client:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            try:
                stream = client.stream(messages=messages, session=session, **generation_options(args))
                for chunk in stream:
                    print(chunk, end="", flush=True)
            except RinglmError as error:
                messages.pop()   # the turn did not happen; the user may try again
                print(f"\nringlm chat: error: {error}", file=sys.stderr)
                continue
            print()
            messages.append({"role": "assistant", "content": stream.result.text})
            if args.verbose:
                print(f"[server {stream.result.server} cached {stream.result.usage.cached_prompt_tokens}]",
                      file=sys.stderr, flush=True)


def command_cluster(args) -> int:
    from ringlm.server.cluster import cluster
    from ringlm.server.config import config_from_args
    return cluster(config_from_args(args), args.count)


def loadtest_target(args):
    from ringlm.client.targets import OpenAITarget, RinglmTarget
    if args.openai_url:
        return OpenAITarget(args.openai_url, model=args.openai_model, ignore_eos=args.ignore_eos)
    if not (args.servers or args.zookeeper):
        raise ValueError("give --servers, --zookeeper or --openai-url")
    return RinglmTarget(cluster_client(args), ignore_eos=args.ignore_eos)


def loadtest_workload(args):
    from ringlm.client import loadtest
    specs = (loadtest.jsonl_workload(Path(args.prompts), args.max_tokens) if args.prompts
             else loadtest.builtin_workload(args.max_tokens))
    if args.priority_mix:
        specs = loadtest.with_priorities(specs, loadtest.parse_priority_mix(args.priority_mix))
    return specs


def command_loadtest(args) -> int:
    from gevent import monkey
    monkey.patch_all()   # the harness's concurrency is greenlets: sockets must cooperate
    from ringlm.client import loadtest

    if args.compare:
        summaries = [json.loads(Path(name).read_text()) for name in args.compare]
        print(loadtest.render_table(summaries, [Path(name).name for name in args.compare]))
        return 0
    if args.concurrency is None and args.rate is None:
        args.concurrency = 8
    if args.requests is None and args.duration is None:
        raise ValueError("give --requests, --duration or both")
    target = loadtest_target(args)
    progress = None if args.no_progress else loadtest_progress(args)
    with (progress or contextlib.nullcontext()) as bar:
        samples, wall = loadtest.run_load(
            target, loadtest_workload(args), concurrency=args.concurrency, rate=args.rate,
            requests=args.requests, duration_s=args.duration, on_sample=bar.advance if bar else None)
    summary = loadtest.summarize(samples, wall, target.name)
    print(loadtest.render_table([summary], [target.name]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        loadtest.plot(summary, Path(args.plot))
    return 0 if summary["requests_ok"] else 1


def loadtest_progress(args):
    """A live progress bar (rich) counting finished requests, or seconds when only --duration is given."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class Bar:
        def __init__(self):
            self.progress = Progress(TextColumn("loadtest"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                     transient=True)
            self.task = self.progress.add_task("", total=args.requests, failed=0)
            self.failed = 0

        def __enter__(self):
            self.progress.__enter__()
            return self

        def __exit__(self, *exc):
            return self.progress.__exit__(*exc)

        def advance(self, sample) -> None:
            self.failed += not sample.ok
            self.progress.update(self.task, advance=1, failed=self.failed)

    return Bar()


def add_zookeeper_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client trusts ZooKeeper's membership: shared by `generate`, `chat` and `loadtest`."""
    parser.add_argument("--zookeeper-auth-file", metavar="FILE", help="file with ZooKeeper digest credentials "
                                                                     "(user:password)")
    parser.add_argument("--zookeeper-allowed-networks", metavar="CIDRS", help="use only servers whose addresses "
                                                                             "lie in these networks "
                                                                             "(e.g. 10.0.0.0/8,fd00::/8)")


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client speaks TLS to the servers: shared by every command that calls them."""
    parser.add_argument("--tls-ca", help="CA certificate that signed the servers' certificates (turns TLS on)")
    parser.add_argument("--tls-cert", help="client certificate, for servers that ask for one")
    parser.add_argument("--tls-key", help="the client certificate's key")


def tls_from_arguments(args):
    """The client's ssl.SSLContext from the TLS flags, or None for plain TCP."""
    from ringlm.client.auth import client_tls_context
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise ValueError("--tls-cert and --tls-key need --tls-ca (the CA that signed the servers)")
        return None
    return client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the cluster is and how to generate: shared by `generate` and `chat`."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--servers", help="host:port,host:port,...")
    where.add_argument("--zookeeper", metavar="HOSTS", help="ZooKeeper hosts (host:port,...[/chroot]) the servers "
                                                            "registered in")
    add_zookeeper_arguments(parser)
    parser.add_argument("--auth-token-file", help="file holding the servers' shared auth token")
    add_tls_arguments(parser)
    parser.add_argument("--session", metavar="KEY", help="routing key: requests sharing it go to the same server")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N", help="new tokens at most (default 256)")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default: greedy)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample within cumulative probability P")
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed (the same seed gives the same text)")
    # Checked by the client, whose names come from the IDL (importing it here would slow every command).
    parser.add_argument("--priority", default="normal", help="low, normal or high: the order among waiting "
                                                             "requests (default normal)")
    parser.add_argument("--deadline-ms", type=int, metavar="MS", help="give up (with what is done) after MS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringlm", description="Language-model serving over Thrift.")
    commands = parser.add_subparsers(dest="command", required=True)

    tokenize = commands.add_parser("tokenize", help="print the token ids of TEXT as JSON")
    tokenize.add_argument("--model", default="default", help="'default', a .gguf file or a HF folder")
    tokenize.add_argument("--plain", action="store_true", help="treat special-token text as plain text")
    tokenize.add_argument("text", nargs="*", help="the text (default: standard input)")
    tokenize.set_defaults(run=command_tokenize)

    detokenize = commands.add_parser("detokenize", help="print the text of token IDS")
    detokenize.add_argument("--model", default="default", help="'default', a .gguf file or a HF folder")
    detokenize.add_argument("--skip-special", action="store_true", help="leave special tokens out")
    detokenize.add_argument("ids", nargs="*", help="a JSON list or space-separated ids (default: standard input)")
    detokenize.set_defaults(run=command_detokenize)

    demo = commands.add_parser("demo", help="the main job: the tokenizer, a local cluster, a chat and a load test")
    demo.add_argument("--model", default="default")
    demo.set_defaults(run=command_demo)

    from ringlm.server.config import add_arguments as add_worker_arguments
    serve = commands.add_parser("serve", help="run N server workers on ports P..P+N-1 until SIGTERM")
    serve.add_argument("--workers", type=process_count, default=1, metavar="N", help="worker processes (default 1)")
    add_worker_arguments(serve)
    serve.set_defaults(run=command_serve)

    status = commands.add_parser("status", help="print each server's status as a JSON line; "
                                                "exit 1 if one is unreachable")
    status.add_argument("--servers", required=True, help="host:port,host:port,...")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per server (default 5)")
    status.add_argument("--auth-token-file", help="file holding the servers' shared auth token")
    add_tls_arguments(status)
    status.set_defaults(run=command_status)

    generate = commands.add_parser("generate", help="generate text for PROMPT on the cluster")
    add_cluster_arguments(generate)
    generate.add_argument("--chat", action="store_true", help="send PROMPT as a user message of a chat")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--json", action="store_true", help="print the whole result as JSON (with --stream: "
                                                              "one line per chunk, then the result)")
    generate.add_argument("prompt", nargs="*", help="the prompt (default: standard input)")
    generate.set_defaults(run=command_generate)

    chat = commands.add_parser("chat", help="chat with the cluster: one user turn per line, /exit to end")
    add_cluster_arguments(chat)
    chat.add_argument("--system", help="a system prompt for the conversation")
    chat.add_argument("--verbose", action="store_true", help="after each reply, print its server and cached "
                                                             "prompt tokens to standard error")
    chat.set_defaults(run=command_chat)

    cluster = commands.add_parser("cluster", help="start N local servers, wait until healthy, stop on Ctrl-C")
    cluster.add_argument("--count", type=process_count, default=2, metavar="N", help="servers to start (default 2)")
    add_worker_arguments(cluster)
    cluster.add_argument("--base-port", dest="port", type=int, default=argparse.SUPPRESS, metavar="P",
                         help="the first server's port, the others following it (the same as --port)")
    cluster.set_defaults(run=command_cluster)

    loadtest = commands.add_parser("loadtest", help="measure a ringlm cluster or an OpenAI-compatible server")
    target = loadtest.add_mutually_exclusive_group()
    target.add_argument("--servers", help="ringlm servers host:port,...")
    target.add_argument("--zookeeper", metavar="HOSTS", help="ringlm servers registered in ZooKeeper")
    target.add_argument("--openai-url", metavar="URL", help="an OpenAI-compatible base URL, e.g. http://host:8080/v1")
    loadtest.add_argument("--openai-model", default="default", help="the model name sent to --openai-url")
    add_zookeeper_arguments(loadtest)
    loadtest.add_argument("--auth-token-file", help="file holding the servers' shared auth token")
    add_tls_arguments(loadtest)
    load = loadtest.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, metavar="N", help="closed loop: N requests in flight (default 8)")
    load.add_argument("--rate", type=float, metavar="R", help="open loop: Poisson arrivals, R requests/s")
    loadtest.add_argument("--requests", type=int, metavar="N", help="stop after N requests")
    loadtest.add_argument("--duration", type=float, metavar="S", help="stop starting requests after S seconds")
    loadtest.add_argument("--max-tokens", type=int, default=64, metavar="N", help="new tokens per request (64)")
    loadtest.add_argument("--prompts", metavar="FILE.jsonl", help="prompts ({\"prompt\"|\"messages\", "
                                                                  "\"session\"?} per line; default: a built-in mix)")
    loadtest.add_argument("--priority-mix", metavar="MIX", help="e.g. high=0.1,normal=0.8,low=0.1")
    loadtest.add_argument("--stop-at-eos", dest="ignore_eos", action="store_false",
                          help="let requests end at the end-of-sequence token (default: always max-tokens)")
    loadtest.add_argument("--json", metavar="FILE", help="write the summary and every sample as JSON")
    loadtest.add_argument("--plot", metavar="FILE.png", help="latency CDFs and throughput over time")
    loadtest.add_argument("--compare", nargs="+", metavar="JSON", help="print earlier --json results side by side")
    loadtest.add_argument("--no-progress", action="store_true", help="no live progress bar")
    loadtest.set_defaults(run=command_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ringlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
