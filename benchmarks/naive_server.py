"""The baseline for bench_e2e: the classic Flask + transformers server, one request at a time.

It loads the default GGUF with transformers (float32), and serves
`POST /v1/completions` by running `generate` under a lock, then sending the
whole answer. With `"stream": true` it sends the finished tokens as
OpenAI-style events after the fact, so the load-test harness can measure it
like any OpenAI-compatible server: its time to first token is the whole
generation, which is what a /predict client experiences.
"""

from __future__ import annotations

import argparse
import json
import threading

import torch
from flask import Flask, Response, request
from transformers import AutoModelForCausalLM

from ringlm.ext.model_files import default_model_path
from ringlm.ext.tokenizer import Tokenizer


def create_app() -> Flask:
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_gguf(path)   # the model's own tokenizer (transformers' GGUF one splits digits wrong)
    lock = threading.Lock()
    app = Flask("naive")

    def complete(prompt: str, max_tokens: int) -> list[int]:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with lock, torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        return output[0, ids.shape[1]:].tolist()

    @app.post("/v1/completions")
    def completions():
        body = request.get_json(force=True)
        tokens = complete(body.get("prompt") or "", int(body.get("max_tokens", 16)))
        if not body.get("stream"):
            return {"choices": [{"text": tokenizer.decode(tokens), "finish_reason": "length"}],
                    "usage": {"completion_tokens": len(tokens)}}

        def events():
            for token in tokens:
                yield f"data: {json.dumps({'choices': [{'text': tokenizer.decode([token])}]})}\n\n"
            usage = {"completion_tokens": len(tokens)}
            yield f"data: {json.dumps({'choices': [{'text': '', 'finish_reason': 'length'}], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return Response(events(), mimetype="text/event-stream")

    @app.get("/health")
    def health():
        return "ok"

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    create_app().run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
