"""The `ringlm` command line: one subcommand per job (tokenize, detokenize, demo, serve, status, ...)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_TEXT = "ringlm serves SmolLM2 over Thrift: 12 workers, 3 rings, naïve café ☕ in 0.5 s."


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
    from ringlm.models import resolve_model_path

    tokenizer = load_tokenizer(args.model)
    print(f"model      {resolve_model_path(args.model)}")
    print(f"vocabulary {tokenizer.vocab_size} tokens, bos={tokenizer.bos_id}, eos={tokenizer.eos_id}")
    ids = tokenizer.encode(DEMO_TEXT)
    print(f"text       {DEMO_TEXT}")
    print(f"ids        {ids}")
    print(f"pieces     {[tokenizer.token_bytes(i).decode('utf-8', 'backslashreplace') for i in ids]}")
    decoded = tokenizer.decode(ids)
    print(f"decoded    {decoded}")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is a hash ring?"}])
    print(f"chat       {prompt!r} -> {len(tokenizer.encode(prompt))} tokens")
    if decoded != DEMO_TEXT:
        print("error: decode(encode(text)) differs from the text", file=sys.stderr)
        return 1
    return 0


def command_serve(args) -> int:
    from ringlm.server.config import config_from_args
    from ringlm.server.supervisor import serve
    return serve(config_from_args(args), args.workers)


def parse_servers(text: str) -> list[tuple[str, int]]:
    servers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"servers are host:port, got {item!r}")
        servers.append((host, int(port)))
    if not servers:
        raise ValueError("--servers lists no server")
    return servers


def server_status(host: str, port: int, args) -> dict:
    """One server's status as a JSON-ready dict (authenticating and using TLS when asked)."""
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TCyFramedTransportFactory

    from ringlm.idl import ringlm_thrift

    tls = {}
    if args.tls_ca:
        import ssl
        context = ssl.create_default_context(cafile=args.tls_ca)
        context.check_hostname = False   # servers are addressed by IP as often as by name
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        tls = {"ssl_context": context}
    client = make_client(ringlm_thrift.Generator, host, port, proto_factory=TCyBinaryProtocolFactory(),
                         trans_factory=TCyFramedTransportFactory(), timeout=int(args.timeout * 1000), **tls)
    try:
        if args.auth_token_file:
            client.authenticate(Path(args.auth_token_file).read_text().strip())
        status = client.status()
    finally:
        client.close()
    return {spec[1]: getattr(status, spec[1]) for spec in status.thrift_spec.values()}


def command_status(args) -> int:
    unreachable = 0
    for host, port in parse_servers(args.servers):
        try:
            report = {"server": f"{host}:{port}", "ok": True, "status": server_status(host, port, args)}
        except Exception as error:   # any failure means this server cannot be used: report it, go on
            unreachable += 1
            report = {"server": f"{host}:{port}", "ok": False, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(report), flush=True)
    return 1 if unreachable else 0


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

    demo = commands.add_parser("demo", help="the main job: load the default model and show it working")
    demo.add_argument("--model", default="default")
    demo.set_defaults(run=command_demo)

    serve = commands.add_parser("serve", help="run N server workers on ports P..P+N-1 until SIGTERM")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    from ringlm.server.config import add_arguments
    add_arguments(serve)
    serve.set_defaults(run=command_serve)

    status = commands.add_parser("status", help="print each server's status as a JSON line; "
                                                "exit 1 if one is unreachable")
    status.add_argument("--servers", required=True, help="host:port,host:port,...")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per server (default 5)")
    status.add_argument("--auth-token-file", help="file holding the servers' shared auth token")
    status.add_argument("--tls-ca", help="CA certificate that signed the servers' certificates (turns TLS on)")
    status.add_argument("--tls-cert", help="client certificate, for servers that ask for one")
    status.add_argument("--tls-key", help="the client certificate's key")
    status.set_defaults(run=command_status)
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
