"""The engine's pure-Python parts with plain objects: stop strings, slots and prefixes, the scheduler's plans,
the request handle, the throughput window; and the engine package's import seams."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from ringlm.ext.sampling import SamplingParams
from ringlm.server.engine.request import (FinishReason, GenerationRequest, Overloaded, Priority, RequestHandle,
                                          RequestState)
from ringlm.server.engine.scheduler import PrefixCopy, Scheduler
from ringlm.server.engine.slots import MIN_COPIED_PREFIX, SlotTable
from ringlm.server.engine.stop import StopMatcher
from ringlm.server.engine.throughput import Throughput


def stream(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.push(p) for p in pieces)


def test_stop_string_across_token_boundaries():
    matcher = StopMatcher(["</answer>"])
    shown = stream(matcher, ["The result", " is 4</", "ans", "wer> and more"])
    assert shown == "The result is 4" and matcher.matched == "</answer>"
    assert matcher.push("ignored") == "" and matcher.flush() == ""


def test_text_that_might_start_a_stop_string_is_held_back():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST") == "abc "
    assert matcher.push("x") == "STx"        # it was not a stop string after all
    assert matcher.push("S") == ""
    assert matcher.flush() == "S" and matcher.matched is None


def test_earliest_stop_string_wins():
    matcher = StopMatcher(["world", "lo"])
    assert stream(matcher, ["hello world"]) == "hel" and matcher.matched == "lo"


def test_no_stop_strings_passes_everything():
    matcher = StopMatcher([])
    assert stream(matcher, ["a", "b"]) == "ab" and matcher.flush() == ""


def test_slot_reuses_a_finished_sequences_prefix():
    table = SlotTable(2)
    first = table.acquire([1, 2, 3, 4])
    assert first.reused_tokens == 0
    table.release(first.slot, [1, 2, 3, 4, 5])
    again = table.acquire([1, 2, 3, 9, 9])
    assert (again.slot, again.reused_tokens, again.copy_from) == (first.slot, 3, None)
    assert table.stats.hits == 1 and table.stats.hit_tokens == 3


def test_full_prompt_hit_leaves_one_token_to_run():
    table = SlotTable(1)
    table.release(table.acquire([5, 6, 7]).slot, [5, 6, 7])
    assert table.acquire([5, 6, 7]).reused_tokens == 2


def test_prefix_of_a_running_sequence_is_copied():
    table = SlotTable(2)
    shared = list(range(100, 100 + MIN_COPIED_PREFIX + 4))
    running = table.acquire(shared + [1])
    table.update(running.slot, shared + [1])
    other = table.acquire(shared + [2])
    assert other.copy_from == running.slot and other.reused_tokens == len(shared)
    assert other.slot != running.slot


def test_a_copy_target_records_the_copied_prefix_not_what_it_held_before():
    """Found by the chaos run: the slot a prefix is copied into kept its evicted sequence's ids, so until
    its own prefill recorded anew (never, when only the prompt's last token was left to run) a later
    request matching those old ids copied out the other prompt's keys and values: wrong tokens."""
    table = SlotTable(3)
    old = list(range(500, 500 + MIN_COPIED_PREFIX + 4))
    table.release(table.acquire(old).slot, old)                 # slot 0 keeps `old`
    table.release(table.acquire([9, 9]).slot, [9, 9])           # slot 1 keeps another, used more recently
    shared = list(range(100, 100 + MIN_COPIED_PREFIX + 4))
    running = table.acquire(shared + [1])
    table.update(running.slot, shared + [1])
    twin = table.acquire(shared + [1])                          # the same prompt again: copied into slot 0, the LRU
    assert (twin.copy_from, twin.slot) == (running.slot, 0)
    assert list(table.slots[twin.slot].tokens) == shared
    again = table.acquire(old + [7])                            # must not take `shared`'s keys for `old`
    assert again.copy_from is None and again.reused_tokens == 0


def test_lru_eviction_and_exhaustion():
    table = SlotTable(2)
    a, b = table.acquire([1, 1]), table.acquire([2, 2])
    assert table.acquire([3, 3]) is None
    table.release(a.slot, [1, 1])
    table.release(b.slot, [2, 2])
    c = table.acquire([3, 3])   # evicts the least recently released: a's
    assert c.slot == a.slot and table.stats.evictions == 1
    assert table.num_kept == 1


def test_prefix_cache_off_never_reuses():
    table = SlotTable(1, prefix_cache=False)
    table.release(table.acquire([1, 2, 3]).slot, [1, 2, 3])
    assert table.acquire([1, 2, 3]).reused_tokens == 0


class PlainDecoder:
    """Token id -> one character: enough for the request state's text bookkeeping."""

    def feed(self, token: int) -> str:
        return chr(ord("a") + token % 26)

    def flush(self) -> str:
        return ""


def state(order: int, priority=Priority.NORMAL, deadline=None, prompt=(1,), **fields) -> RequestState:
    request = GenerationRequest(f"r{order}", list(prompt), priority=priority, deadline=deadline, **fields)
    return RequestState(request, PlainDecoder(), arrival_order=order, new_event=threading.Event)


def scheduler(num_slots=4, max_batch_tokens=64, max_waiting=256, prefix_cache=True) -> Scheduler:
    return Scheduler(num_slots, max_batch_tokens, max_waiting, prefix_cache)


def pop_all(sched: Scheduler) -> list[int]:
    """Admission order, one slot at a time: each schedule admits the next and the test ends it."""
    order = []
    while len(sched):
        plan = sched.schedule(now=0.0)
        for admitted in list(sched.running):
            order.append(admitted.arrival_order)
            sched.release(admitted)
    return order


def test_admission_order_is_priority_then_deadline_then_arrival():
    sched = scheduler(num_slots=1)
    states = [state(0, Priority.LOW), state(1), state(2, deadline=50.0),
              state(3, Priority.HIGH), state(4, deadline=10.0), state(5, Priority.HIGH)]
    for s in states:
        sched.add(s)
    assert pop_all(sched) == [3, 5, 4, 2, 1, 0]


def test_queue_limit_per_priority_with_retry_hint():
    sched = scheduler(max_waiting={Priority.LOW: 1, Priority.NORMAL: 2, Priority.HIGH: 2})
    sched.add(state(0, Priority.LOW))
    with pytest.raises(Overloaded, match="LOW queue is full") as error:
        sched.check_capacity(Priority.LOW)
    assert error.value.retry_after_ms >= 50
    sched.check_capacity(Priority.NORMAL)   # other priorities unaffected


def test_preemption_picks_the_newest_lowest_priority():
    running = [state(0, Priority.LOW), state(1, Priority.LOW), state(2, Priority.NORMAL)]
    assert Scheduler.preemption_victim(running, state(3, Priority.HIGH)).arrival_order == 1
    assert Scheduler.preemption_victim(running, state(4, Priority.LOW)) is None


def test_a_plan_decodes_first_in_slot_order_then_prefills_within_the_budget():
    sched = scheduler(num_slots=4, max_batch_tokens=10)
    decoding = [state(i, prompt=[7, 8, 9]) for i in range(2)]
    for s in decoding:
        sched.add(s)
    sched.schedule(now=0.0)
    for s in decoding:
        s.cached = 3
        s.token_ids.append(42)   # each sampled a token: one to run next
    long_prompt = state(2, prompt=range(100, 120))
    sched.add(long_prompt)
    plan = sched.schedule(now=0.0)
    assert [(c.state.arrival_order, c.start, c.count, c.sample) for c in plan.chunks] == [
        (0, 3, 1, True), (1, 3, 1, True), (2, 0, 8, False)]   # 10 tokens: two decodes, 8 of the prompt
    assert [c.state.slot for c in plan.chunks[:2]] == sorted(c.state.slot for c in plan.chunks[:2])
    assert plan.chunks[2].token_ids == list(range(100, 108))
    for chunk in plan.chunks:
        sched.advance(chunk)
    assert long_prompt.cached == 8 and sched.slots.slots[long_prompt.slot].tokens.tolist() == list(range(100, 108))


def test_a_plan_ends_cancelled_and_expired_requests_before_any_work():
    sched = scheduler(num_slots=1)
    running, queued, cancelled = state(0, deadline=5.0), state(1, deadline=9.0), state(2)
    for s in (running, queued, cancelled):
        sched.add(s)
    sched.schedule(now=0.0)
    assert sched.running == [running]
    cancelled.end_requested = FinishReason.CANCELLED
    plan = sched.schedule(now=6.0)
    assert plan.ended == [(cancelled, FinishReason.CANCELLED), (running, FinishReason.DEADLINE)]
    assert sched.running == [queued] and len(sched) == 0 and running.slot is None


def test_a_shared_prefix_of_a_running_request_is_planned_as_a_copy():
    sched = scheduler(num_slots=2)
    shared = list(range(200, 200 + MIN_COPIED_PREFIX + 4))
    first = state(0, prompt=shared + [1])
    sched.add(first)
    for chunk in sched.schedule(now=0.0).chunks:
        sched.advance(chunk)
    second = state(1, prompt=shared + [2])
    sched.add(second)
    plan = sched.schedule(now=0.0)
    assert plan.prefix_copies == [PrefixCopy(first.slot, second.slot, len(shared))]
    assert second.cached == len(shared) and second.cached_prompt_tokens == len(shared)


def test_preemption_requeues_the_victim_and_frees_its_slot():
    sched = scheduler(num_slots=1)
    low = state(0, Priority.LOW, prompt=[1, 2, 3])
    sched.add(low)
    for chunk in sched.schedule(now=0.0).chunks:
        sched.advance(chunk)
    high = state(1, Priority.HIGH, prompt=[4, 5])
    sched.add(high)
    sched.schedule(now=0.0)
    assert sched.running == [high] and len(sched) == 1 and sched.preemptions == 1
    assert low.slot is None and low.cached == 0 and low.preemptions == 1


def test_a_long_wait_raises_a_requests_priority_so_it_is_not_starved():
    for aging_s, expected in ((10.0, [0, 1]), (0.0, [1, 0])):
        sched = Scheduler(1, 64, 256, priority_aging_s=aging_s)
        old_low = state(0, Priority.LOW)
        sched.add(old_low, now=old_low.times.arrival)
        newer_normal = state(1, Priority.NORMAL)
        later = old_low.times.arrival + 25.0   # two aging steps: LOW waited its way past NORMAL
        newer_normal.times.arrival = later
        sched.add(newer_normal, now=later)
        plan = sched.schedule(now=later)
        assert [sched.running[0].arrival_order, sched._heap[0][1].arrival_order] == expected, aging_s
        assert plan.chunks[0].state is sched.running[0] and sched.preemptions == 0


def test_aging_stops_at_the_highest_priority():
    s = state(0, Priority.LOW)
    assert s.effective_priority(s.times.arrival + 1000.0, 10.0) == Priority.HIGH
    assert s.effective_priority(s.times.arrival + 1000.0, 0.0) == Priority.LOW


def finish(s: RequestState, reason=FinishReason.LENGTH) -> None:
    """What the engine does when a request ends (its text tail, then the events)."""
    s.finish_reason = reason
    s.text_parts.append("!")
    s.ended.set()
    s.produced.set()


def produce(s: RequestState, token: int) -> None:
    s.token_ids.append(token)
    s.logprobs.append(-0.5)
    s.top_logprobs.append([])
    s.text_parts.append(s.decoder.feed(token))
    s.produced.set()


def test_a_handle_polls_everything_new_and_the_end_once():
    s = state(0, prompt=[1, 2])
    handle = RequestHandle(s, cancel=lambda request_id: False)
    assert handle.poll(timeout=0).token_ids == []   # nothing yet: an empty output, not a wait
    produce(s, 3)
    produce(s, 4)
    first = handle.poll(timeout=0)
    assert (first.token_ids, first.text, first.finished) == ([3, 4], "de", False)
    produce(s, 5)
    finish(s)
    last = handle.poll(timeout=0)
    assert (last.token_ids, last.text, last.finished, last.finish_reason) == ([5], "f!", True, FinishReason.LENGTH)
    with pytest.raises(RuntimeError, match="has ended"):
        handle.poll(timeout=0)
    result = handle.result()
    assert (result.token_ids, result.text, result.completion_tokens) == ([3, 4, 5], "def!", 3)


def test_a_waiting_result_wakes_once_not_per_token():
    s = state(0)
    wakes = []

    class CountingEvent(threading.Event):
        def wait(self, timeout=None):
            wakes.append(self)
            return super().wait(timeout)

    s.ended = CountingEvent()
    handle = RequestHandle(s, cancel=lambda request_id: False)
    waiter = threading.Thread(target=handle.result)
    waiter.start()
    for token in range(50):
        produce(s, token)
    finish(s)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and len(wakes) == 1


def test_a_resumed_request_reports_only_its_new_tokens():
    s = state(0, prompt=[1], resume_ids=(7, 8), max_tokens=5)
    produce(s, 9)
    finish(s)
    result = RequestHandle(s, cancel=lambda request_id: False).result()
    assert result.token_ids == [9] and result.completion_tokens == 1


def test_penalty_history_is_kept_only_for_requests_with_penalties():
    plain = state(0, resume_ids=(7,), max_tokens=4)
    penalised = state(1, resume_ids=(7,), max_tokens=4, sampling=SamplingParams(presence_penalty=0.5))
    assert plain.penalty_history is None
    penalised.penalty_history.append(9)
    assert penalised.penalty_history.view().tolist() == [7, 9]


def test_throughput_counts_the_last_window_in_fixed_memory():
    rate = Throughput(window_seconds=10)
    for i in range(100_000):
        rate.add(1000.0 + i / 10_000)   # 100,000 tokens over 10 s
    assert rate.per_second(1009.99) == 10_000
    assert rate.per_second(1015.5) == pytest.approx(4_000 + 0, abs=1)   # seconds 1006..1009 remain
    assert rate.per_second(1030.0) == 0
    assert len(rate._counts) == 10


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


BLOCK_GEVENT = """
import sys
class NoGevent:
    def find_spec(self, name, path=None, target=None):
        if name == "gevent" or name.startswith("gevent."):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, NoGevent())
"""


def test_the_engine_package_imports_without_gevent_or_thrift():
    done = run_python(BLOCK_GEVENT + "import ringlm.server.engine, sys\n"
                      "assert 'thriftpy2' not in sys.modules, 'thriftpy2 loaded'\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
