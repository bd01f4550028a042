"""The `ringlm` command line: one subcommand per job (tokenize, detokenize, demo, ...)."""

from __future__ import annotations

import argparse
import json
import sys

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
