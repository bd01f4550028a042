"""What the load-test harness sends requests to: a ringlm cluster, or an OpenAI-compatible HTTP endpoint.

Each target's `stream(spec, sample)` yields the number of new output tokens
as they arrive and fills in the sample's outcome and usage at the end, so the
harness measures both kinds of server the same way.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

from ringlm.client.loadtest import RequestSpec, Sample


class RinglmTarget:
    """A ringlm cluster through the consistent-hash Client (streamed, greedy, EOS ignored)."""

    def __init__(self, client, ignore_eos: bool = True):
        self.client = client
        self.ignore_eos = ignore_eos
        self.name = "ringlm " + ",".join(sorted(client.servers))

    def stream(self, spec: RequestSpec, sample: Sample) -> Iterator[int]:
        stream = self.client.stream(spec.prompt, messages=spec.messages, session=spec.session,
                                    max_tokens=spec.max_tokens, priority=spec.priority,
                                    ignore_eos=self.ignore_eos)
        seen = 0
        for _ in stream:
            yield len(stream.token_ids) - seen
            seen = len(stream.token_ids)
        result = stream.result
        if len(result.token_ids) > seen:   # tokens that came with no text of their own (e.g. EOS)
            yield len(result.token_ids) - seen
        sample.outcome = result.finish_reason
        sample.prompt_tokens = result.usage.prompt_tokens
        sample.cached_prompt_tokens = result.usage.cached_prompt_tokens


class OpenAIError(Exception):
    """The endpoint answered with an HTTP error or a malformed event stream."""


class OpenAITarget:
    """An OpenAI-compatible server (llama.cpp's llama-server, vLLM, TGI) over streamed HTTP.

    Counts one output token per streamed content delta (these servers send one
    token per event), or the server's own usage count when it reports one.
    """

    def __init__(self, base_url: str, model: str = "default", timeout_s: float = 600.0, ignore_eos: bool = False):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--openai-url must be an http(s) URL, got {base_url!r}")
        self.parts = parts
        self.path = parts.path.rstrip("/") or "/v1"
        self.model = model
        self.timeout_s = timeout_s
        self.ignore_eos = ignore_eos   # llama.cpp's and vLLM's extension: always produce max_tokens
        self.name = f"openai {base_url}"

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        return kind(self.parts.hostname, self.parts.port, timeout=self.timeout_s)

    def stream(self, spec: RequestSpec, sample: Sample) -> Iterator[int]:
        chat = spec.messages is not None
        body = {"model": self.model, "max_tokens": spec.max_tokens, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
        body.update({"messages": spec.messages} if chat else {"prompt": spec.prompt})
        if self.ignore_eos:
            body["ignore_eos"] = True
        connection = self._connection()
        try:
            connection.request("POST", f"{self.path}/{'chat/completions' if chat else 'completions'}",
                               json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise OpenAIError(f"HTTP {response.status}: {response.read(300)!r}")
            yield from self._events(response, sample, chat)
        finally:
            connection.close()

    def _events(self, response, sample: Sample, chat: bool) -> Iterator[int]:
        counted = 0
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise OpenAIError(f"not JSON in the event stream: {data[:100]!r}") from None
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    counted += 1
                    yield 1
                if choice.get("finish_reason"):
                    sample.outcome = choice["finish_reason"]
            usage = event.get("usage")
            if usage:
                sample.prompt_tokens = usage.get("prompt_tokens") or 0
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                sample.cached_prompt_tokens = cached or 0
                extra = (usage.get("completion_tokens") or 0) - counted
                if extra > 0:   # tokens the server streamed without text (e.g. the last one)
                    counted += extra
                    yield extra
