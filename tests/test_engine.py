"""The batching engine with a real (tiny, random) model: batching invariance, scheduling, stops, limits.

The engine runs here without gevent (threading Events, the model step in the calling thread), as
offline users run it; `gevent_engine` and `EngineLoop` are tested at the end, as a worker runs them.
"""

from __future__ import annotations

import dataclasses
import time

import gevent
import pytest
import torch

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import Tokenizer
from ringlm.ext.model_files import default_model_path
from ringlm.server.engine import (Engine, EngineConfig, FinishReason, GenerationRequest, InvalidRequest,
                                  Overloaded, Priority)
from ringlm.server.engine_loop import EngineLoop, gevent_engine
from ringlm.server.model.llama import Llama, ModelConfig
from ringlm.server.model.weights import random_weights

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def model() -> Llama:
    """Random weights with SmolLM2's vocabulary, so real text and the real tokenizer apply."""
    config = ModelConfig.tiny(vocab_size=49152, max_position_embeddings=512)
    return Llama.from_hf_weights(config, random_weights(config, seed=3))


ENGINE_DEFAULTS = {"num_slots": 8, "max_seq_len": 256, "max_batch_tokens": 64}


def make_engine(model, tokenizer, **overrides) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**{**ENGINE_DEFAULTS, **overrides}))


def make_gevent_engine(model, tokenizer, **overrides) -> Engine:
    return gevent_engine(model, tokenizer, EngineConfig(**{**ENGINE_DEFAULTS, **overrides}))


def request(tokenizer, rid: str, text: str, **fields) -> GenerationRequest:
    fields.setdefault("sampling", GREEDY)
    fields.setdefault("max_tokens", 12)
    fields.setdefault("ignore_eos", True)
    return GenerationRequest(rid, tokenizer.encode(text), **fields)


def run_alone(model, tokenizer, req: GenerationRequest, **overrides):
    engine = make_engine(model, tokenizer, **overrides)
    handle = engine.submit(req)
    engine.run_until_idle()
    return handle.result()


PROMPTS = [f"Request number {i}: tell me about topic {i * 7} and more " * (1 + i % 3) for i in range(16)]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_requests_equal_each_alone(model, tokenizer, sampling):
    requests = [request(tokenizer, f"r{i}", p, sampling=dataclasses.replace(sampling, seed=sampling.seed and sampling.seed + i))
                for i, p in enumerate(PROMPTS)]
    alone = [run_alone(model, tokenizer, r).token_ids for r in requests]
    engine = make_engine(model, tokenizer, num_slots=16)
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    together = [h.result().token_ids for h in handles]
    assert together == alone
    assert all(len(ids) == 12 for ids in together)


def test_request_joining_midway_changes_nothing(model, tokenizer):
    first = [request(tokenizer, f"a{i}", p, max_tokens=20) for i, p in enumerate(PROMPTS[:4])]
    late = request(tokenizer, "late", PROMPTS[5], max_tokens=20)
    expected = [run_alone(model, tokenizer, r).token_ids for r in first + [late]]
    engine = make_engine(model, tokenizer)
    handles = [engine.submit(r) for r in first]
    for _ in range(5):
        engine.step()
    handles.append(engine.submit(late))
    engine.run_until_idle()
    assert [h.result().token_ids for h in handles] == expected


def test_chunked_prefill_gives_the_same_tokens(model, tokenizer):
    long = request(tokenizer, "long", "A long prompt that needs several chunks. " * 12, max_tokens=8)
    assert len(long.prompt_ids) > 64
    chunked = run_alone(model, tokenizer, long, max_batch_tokens=16).token_ids
    whole = run_alone(model, tokenizer, long, max_batch_tokens=256).token_ids
    assert chunked == whole


def test_prefix_cache_hit_gives_the_same_tokens(model, tokenizer):
    system = "You are a careful assistant. Answer briefly and precisely. " * 3
    engine = make_engine(model, tokenizer)
    engine.submit(request(tokenizer, "warm", system + "First question?"))
    engine.run_until_idle()
    hit_request = request(tokenizer, "hit", system + "Second question?")
    handle = engine.submit(hit_request)
    engine.run_until_idle()
    hit = handle.result()
    miss = run_alone(model, tokenizer, hit_request, prefix_cache=False)
    assert hit.cached_prompt_tokens >= len(tokenizer.encode(system)) - 1
    assert miss.cached_prompt_tokens == 0
    assert hit.token_ids == miss.token_ids
    assert engine.stats()["prefix_cache_hits"] >= 1


def test_shared_prefix_copied_from_a_running_request(model, tokenizer):
    system = "Shared system prompt with enough tokens to be worth copying. " * 2
    engine = make_engine(model, tokenizer)
    a = engine.submit(request(tokenizer, "a", system + "one", max_tokens=30))
    engine.step()   # a's prompt is now in its slot
    b_request = request(tokenizer, "b", system + "two")
    b = engine.submit(b_request)
    engine.run_until_idle()
    assert b.result().cached_prompt_tokens > 16
    assert b.result().token_ids == run_alone(model, tokenizer, b_request, prefix_cache=False).token_ids
    assert a.result().finish_reason == FinishReason.LENGTH


def test_priority_order_when_slots_are_scarce(model, tokenizer):
    engine = make_engine(model, tokenizer, num_slots=1)
    finished = []
    blocker = engine.submit(request(tokenizer, "blocker", "x", max_tokens=3))
    handles = {name: engine.submit(request(tokenizer, name, "y", max_tokens=2, priority=priority))
               for name, priority in [("low", Priority.LOW), ("normal", Priority.NORMAL), ("high", Priority.HIGH)]}
    while engine.step() or engine.has_work():
        for name, handle in handles.items():
            if name not in finished and handle.finished:
                finished.append(name)
    assert blocker.result().finish_reason == FinishReason.LENGTH
    # "high" preempts the NORMAL blocker; "normal" waits for the blocker, "low" for everyone.
    assert finished.index("high") < finished.index("normal") < finished.index("low")


def test_preempted_request_resumes_with_unchanged_output(model, tokenizer):
    low_request = request(tokenizer, "low", PROMPTS[3], max_tokens=24, priority=Priority.LOW, sampling=SEEDED)
    expected = run_alone(model, tokenizer, low_request).token_ids
    engine = make_engine(model, tokenizer, num_slots=1)
    low = engine.submit(low_request)
    for _ in range(6):
        engine.step()
    high = engine.submit(request(tokenizer, "high", PROMPTS[4], max_tokens=5, priority=Priority.HIGH))
    engine.run_until_idle()
    assert high.result().finish_reason == FinishReason.LENGTH
    assert engine.stats()["preemptions"] == 1
    assert low.result().token_ids == expected


def test_deadline_while_queued_and_while_running(model, tokenizer):
    engine = make_engine(model, tokenizer, num_slots=1)
    start = time.monotonic()
    # The earlier deadline is admitted first: "running" takes the only slot.
    running = engine.submit(request(tokenizer, "running", "a", max_tokens=200, deadline=start + 0.3))
    queued = engine.submit(request(tokenizer, "queued", "b", deadline=start + 0.5))
    for _ in range(3):
        engine.step()
    time.sleep(max(0.0, start + 0.5 - time.monotonic()))   # both deadlines pass
    engine.run_until_idle()
    queued_result, running_result = queued.result(), running.result()
    assert queued_result.finish_reason == FinishReason.DEADLINE and queued_result.token_ids == []
    assert running_result.finish_reason == FinishReason.DEADLINE
    assert len(running_result.token_ids) == 3   # the tokens so far are kept
    assert engine.stats()["slots_busy"] == 0


def test_cancel_frees_the_slot(model, tokenizer):
    engine = make_engine(model, tokenizer, num_slots=1)
    first = engine.submit(request(tokenizer, "first", "a", max_tokens=200))
    second = engine.submit(request(tokenizer, "second", "b", max_tokens=3))
    for _ in range(3):
        engine.step()
    assert engine.cancel("first") and not engine.cancel("unknown")
    engine.run_until_idle()
    assert first.result().finish_reason == FinishReason.CANCELLED
    assert 0 < len(first.result().token_ids) < 200
    assert second.result().finish_reason == FinishReason.LENGTH


def test_overload_is_refused_at_once(model, tokenizer):
    engine = make_engine(model, tokenizer, max_waiting=1)
    engine.submit(request(tokenizer, "l1", "a", priority=Priority.LOW))
    with pytest.raises(Overloaded) as refused:
        engine.submit(request(tokenizer, "l2", "a", priority=Priority.LOW))
    assert refused.value.retry_after_ms > 0
    engine.submit(request(tokenizer, "n1", "a"))   # another priority still has room
    engine.run_until_idle()


def bias(token_id: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, logit_bias={token_id: 100.0})


def test_stop_conditions(model, tokenizer):
    the = tokenizer.encode(" the")[0]
    eos = tokenizer.eos_id
    engine = make_engine(model, tokenizer)
    by_eos = engine.submit(request(tokenizer, "eos", "x", sampling=bias(eos), ignore_eos=False))
    by_id = engine.submit(request(tokenizer, "id", "x", sampling=bias(the), stop_token_ids=(the,)))
    by_string = engine.submit(request(tokenizer, "string", "x", sampling=bias(the), stop=("e th",)))
    by_length = engine.submit(request(tokenizer, "length", "x", sampling=bias(the), max_tokens=4))
    engine.run_until_idle()
    assert (by_eos.result().finish_reason, by_eos.result().stop_reason) == (FinishReason.STOP, eos)
    assert by_eos.result().text == ""
    assert (by_id.result().finish_reason, by_id.result().stop_reason) == (FinishReason.STOP, the)
    string = by_string.result()
    assert (string.finish_reason, string.stop_reason, string.text) == (FinishReason.STOP, "e th", " th")
    assert (by_length.result().finish_reason, by_length.result().text) == (FinishReason.LENGTH, " the" * 4)


def test_streamed_outputs_add_up_to_the_result(model, tokenizer):
    engine = make_gevent_engine(model, tokenizer)
    handle = engine.submit(request(tokenizer, "s", "stream me", max_tokens=10, top_logprobs=3))
    loop = EngineLoop(engine)
    loop.start()
    try:
        outputs = list(handle)
    finally:
        loop.stop()
    tokens = [t for o in outputs for t in o.token_ids]
    assert len(tokens) == 10 and outputs[-1].finished and outputs[-1].finish_reason == FinishReason.LENGTH
    assert all(len(top) == 3 for o in outputs[:-1] for top in o.top_logprobs)
    assert "".join(o.text for o in outputs) == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("change, field", [
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=[1] * 256), "prompt"),
    (dict(prompt_ids=[49152]), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10**9), "max_tokens"),
    (dict(top_logprobs=99), "top_logprobs"),
    (dict(request_id=""), "request_id"),
    (dict(resume_ids=(49152,)), "resume_ids"),
    (dict(resume_ids=(5,) * 12), "resume_ids"),              # already max_tokens (12) tokens
    (dict(prompt_ids=[1] * 200, resume_ids=(5,) * 56), "prompt"),   # 256 with the slot's 256
    (dict(stop_token_ids=(49152,)), "stop_token_ids"),
    (dict(sampling=SamplingParams(logit_bias={49152: 1.0})), "sampling.logit_bias"),
])
def test_invalid_requests(model, tokenizer, change, field):
    engine = make_engine(model, tokenizer)
    with pytest.raises(InvalidRequest) as error:
        engine.submit(dataclasses.replace(request(tokenizer, "bad", "x"), **change))
    assert error.value.field == field


def test_duplicate_request_id_in_flight(model, tokenizer):
    engine = make_engine(model, tokenizer)
    engine.submit(request(tokenizer, "same", "x"))
    with pytest.raises(InvalidRequest, match="already in flight"):
        engine.submit(request(tokenizer, "same", "y"))


def test_the_hub_keeps_running_while_the_model_computes(model, tokenizer):
    """With offload on, other greenlets run during forward passes (the model is in a native thread)."""
    engine = make_gevent_engine(model, tokenizer, max_batch_tokens=256)
    loop = EngineLoop(engine)
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.001)

    ticking = gevent.spawn(ticker)
    loop.start()
    try:
        handles = [engine.submit(request(tokenizer, f"t{i}", PROMPTS[i] * 3, max_tokens=30)) for i in range(8)]
        results = [h.result() for h in handles]
    finally:
        loop.stop()
        ticking.kill()
    assert all(r.finish_reason == FinishReason.LENGTH for r in results)
    steps = engine.counters["steps"]
    assert len(ticks) > steps   # the ticker ran between and during steps


def test_real_model_greedy_matches_transformers(real_model, real_model_transformers, tokenizer):
    """Greedy continuations through the engine equal transformers' greedy generate (same token ids)."""
    engine = Engine(real_model, tokenizer, EngineConfig(num_slots=4, max_seq_len=256))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Write a haiku about the sea.",
                         "List three prime numbers.")]
    handles = [engine.submit(GenerationRequest(f"p{i}", tokenizer.encode(p), GREEDY, max_tokens=16))
               for i, p in enumerate(prompts)]
    engine.run_until_idle()
    for prompt, handle in zip(prompts, handles):
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = real_model_transformers.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                    max_new_tokens=16)[0, ids.shape[1]:]
        assert handle.result().token_ids == expected.tolist()


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=7,
                                                             repetition_penalty=1.3, presence_penalty=0.5)],
                         ids=["greedy", "seeded-penalised"])
def test_resume_ids_continue_exactly(model, tokenizer, sampling):
    """Failover: a second engine given the tokens so far continues with the same tokens and text."""
    whole = run_alone(model, tokenizer, request(tokenizer, "whole", "Once upon a time", max_tokens=20,
                                                sampling=sampling, stop=("zzz-never",)))
    engine = make_engine(model, tokenizer)
    handle = engine.submit(request(tokenizer, "first", "Once upon a time", max_tokens=20, sampling=sampling,
                                   stop=("zzz-never",)))
    received, text = [], ""
    while len(received) < 7:   # the first server "dies" after 7 tokens
        engine.step()
        output = handle.poll(timeout=0)
        received += output.token_ids
        text += output.text
    rest = run_alone(model, tokenizer, request(tokenizer, "resumed", "Once upon a time", max_tokens=20,
                                               sampling=sampling, stop=("zzz-never",),
                                               resume_ids=tuple(received)))
    assert received + rest.token_ids == whole.token_ids
    assert text + rest.text == whole.text
    assert rest.completion_tokens == 13


def test_a_failing_step_fails_its_requests_not_the_engine(model, tokenizer, monkeypatch):
    engine = make_gevent_engine(model, tokenizer)
    loop = EngineLoop(engine)
    loop.start()
    try:
        broken = engine.submit(request(tokenizer, "broken", "a", max_tokens=5))
        with monkeypatch.context() as patch:
            patch.setattr(engine.runner, "run", lambda *args: 1 / 0)
            assert broken.result().finish_reason == FinishReason.ERROR
        healthy = engine.submit(request(tokenizer, "healthy", "b", max_tokens=5))
        assert healthy.result().finish_reason == FinishReason.LENGTH   # the loop is still alive
    finally:
        loop.stop()
    assert engine.stats()["slots_busy"] == 0


def test_resumed_tokens_are_prefilled_in_chunks_not_one_per_step(model, tokenizer):
    """A failover after many tokens costs a few steps: the resumed ids go through prefill with the prompt."""
    prompt = request(tokenizer, "p", "Once upon a time", max_tokens=200)
    whole = run_alone(model, tokenizer, prompt)
    engine = make_engine(model, tokenizer, max_batch_tokens=64)
    resumed = dataclasses.replace(prompt, request_id="resumed", resume_ids=tuple(whole.token_ids[:150]))
    handle = engine.submit(resumed)
    engine.step()
    engine.step()
    engine.step()   # ceil((prompt + 150) / 64) = 3 prefill steps, the last one samples
    first = handle.poll(timeout=0)
    assert first.token_ids == whole.token_ids[150:151]
    engine.run_until_idle()
    assert handle.result().token_ids == whole.token_ids[150:]


def test_send_away_ends_queued_requests_and_then_running_ones(model, tokenizer):
    engine = make_engine(model, tokenizer, num_slots=1)
    running = engine.submit(request(tokenizer, "running", "a", max_tokens=50))
    queued = engine.submit(request(tokenizer, "queued", "b", max_tokens=50))
    engine.step()
    assert engine.send_away() == 1   # only the queued one
    engine.step()
    assert queued.finished and queued.result().finish_reason == FinishReason.SENT_AWAY
    assert queued.result().token_ids == [] and not running.finished
    assert engine.send_away(running=True) == 1
    engine.run_until_idle()
    result = running.result()
    assert result.finish_reason == FinishReason.SENT_AWAY and 0 < len(result.token_ids) < 50
    assert engine.stats()["slots_busy"] == 0


def test_a_request_admitted_by_a_step_that_raises_fails_instead_of_hanging(model, tokenizer, monkeypatch):
    """The scheduler moved it out of the queue before the fault: it must still get an answer."""
    engine = make_gevent_engine(model, tokenizer)
    loop = EngineLoop(engine)
    real_batch = engine.scheduler._batch
    faults = iter([True])

    def batch_once_broken():
        if next(faults, False):
            raise RuntimeError("a fault between admission and the batch")
        return real_batch()

    monkeypatch.setattr(engine.scheduler, "_batch", batch_once_broken)
    loop.start()
    try:
        admitted = engine.submit(request(tokenizer, "admitted", "a", max_tokens=5))
        assert admitted.result(timeout=60).finish_reason == FinishReason.ERROR
        later = engine.submit(request(tokenizer, "later", "b", max_tokens=5))
        assert later.result(timeout=60).finish_reason == FinishReason.LENGTH
    finally:
        loop.stop()
