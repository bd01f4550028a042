"""The engine's pure-Python parts: stop-string matching, slot/prefix bookkeeping, admission order."""

from __future__ import annotations

import pytest

from ringlm.server.engine.request import GenerationRequest, Overloaded, Priority, Sequence
from ringlm.server.engine.scheduler import Scheduler, SchedulerConfig
from ringlm.server.engine.slots import MIN_COPIED_PREFIX, SlotTable
from ringlm.server.engine.stop import StopMatcher


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


def sequence(order: int, priority=Priority.NORMAL, deadline=None) -> Sequence:
    request = GenerationRequest(f"r{order}", [1], priority=priority, deadline=deadline)
    return Sequence(request, decoder=None, arrival_order=order)


def test_admission_order_is_priority_then_deadline_then_arrival():
    scheduler = Scheduler()
    seqs = [sequence(0, Priority.LOW), sequence(1), sequence(2, deadline=50.0),
            sequence(3, Priority.HIGH), sequence(4, deadline=10.0), sequence(5, Priority.HIGH)]
    for seq in seqs:
        scheduler.add(seq)
    assert [scheduler.pop().arrival_order for _ in seqs] == [3, 5, 4, 2, 1, 0]


def test_queue_limit_per_priority_with_retry_hint():
    scheduler = Scheduler(SchedulerConfig(max_waiting={Priority.LOW: 1, Priority.NORMAL: 2, Priority.HIGH: 2}))
    scheduler.add(sequence(0, Priority.LOW))
    with pytest.raises(Overloaded, match="LOW queue is full") as error:
        scheduler.check_capacity(Priority.LOW, parallelism=4)
    assert error.value.retry_after_ms >= 50
    scheduler.check_capacity(Priority.NORMAL, parallelism=4)   # other priorities unaffected


def test_preemption_picks_the_newest_lowest_priority():
    running = [sequence(0, Priority.LOW), sequence(1, Priority.LOW), sequence(2, Priority.NORMAL)]
    assert Scheduler.preemption_victim(running, sequence(3, Priority.HIGH)).arrival_order == 1
    assert Scheduler.preemption_victim(running, sequence(4, Priority.LOW)) is None
