"""The batched sampler against transformers' logits processors: distributions, logprobs, determinism."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper)

from ringlm.ext import _sampling, sampling
from ringlm.ext.sampling import InvalidLogitsError, SamplingParams, sample, sample_on_device

SIGNIFICANCE = 1e-4   # a correct sampler fails a test with this probability; the seeds are fixed
DRAWS = 20_000


# ---- the oracle ----------------------------------------------------------------------------

def penalised(row: np.ndarray, params: SamplingParams, history=()) -> torch.Tensor:
    """Bias, then transformers' repetition penalty, then OpenAI's frequency and presence terms."""
    y = torch.from_numpy(row.astype(np.float32).copy())[None]
    for token, bias in (params.logit_bias or {}).items():
        y[0, token] += np.float32(bias)
    if len(history):
        y = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([list(history)]), y)
        ids, counts = np.unique(np.asarray(history), return_counts=True)
        y[0, ids] = ((y[0, ids] - np.float32(params.frequency_penalty) * torch.from_numpy(counts).float())
                     - np.float32(params.presence_penalty))
    return y


def reference(row: np.ndarray, params: SamplingParams, history=()) -> np.ndarray:
    """The exact distribution `params` draw from (float64): transformers' warpers pick the kept
    tokens, in the order temperature, top-k, top-p, min-p. For greedy rows, the softmax at
    temperature 1 that their logprobs come from."""
    y = penalised(row, params, history)
    if params.temperature < 1e-5:
        return torch.softmax(y[0].double(), 0).numpy()
    warped = TemperatureLogitsWarper(params.temperature)(None, y)
    for warper, on in ((TopKLogitsWarper(max(params.top_k, 1)), params.top_k > 0),
                       (TopPLogitsWarper(params.top_p), params.top_p < 1),
                       (MinPLogitsWarper(max(params.min_p, 1e-9)), params.min_p > 0)):
        if on:
            warped = warper(None, warped)
    z = y[0].double() / params.temperature
    z[torch.isinf(warped[0])] = -math.inf
    return torch.softmax(z, 0).numpy()


def chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """P(a chi-square this large or larger), pooling the rarest outcomes until every bin expects 5."""
    order = np.argsort(expected)
    counts, expected = counts[order], expected[order]
    pooled = int(np.searchsorted(np.cumsum(expected), 5.0)) + 1
    observed = np.append(counts[pooled:], counts[:pooled].sum())
    expected = np.append(expected[pooled:], expected[:pooled].sum())
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


def draws(row: np.ndarray, params: SamplingParams, n: int, history=()):
    """n samples of one row (batches of copies of it, 16 MB at a time), seeded from a fixed generator."""
    tokens, logprobs = [], []
    chunk = max(1, 2**22 // len(row))
    generator = np.random.default_rng(1)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        out = sample(np.tile(row, (rows, 1)), [params] * rows, np.full(rows, 11), [history] * rows,
                     generator=generator)
        tokens.append(out.token_ids)
        logprobs.append(out.logprobs)
    return np.concatenate(tokens), np.concatenate(logprobs)


def assert_draws_follow(row, params, n=DRAWS, history=()):
    expected = reference(row, params, history)
    tokens, logprobs = draws(row, params, n, history)
    assert expected[tokens].min() > 0, "drew a token the filters remove"
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), rtol=0, atol=1e-5)
    p = chi_square_p_value(np.bincount(tokens, minlength=len(row))[expected > 0], n * expected[expected > 0])
    assert p > SIGNIFICANCE, f"frequencies do not match the exact distribution (p = {p:.2e})"


def lm_like(rows: int, vocab: int, seed: int, spread: float = 3.5) -> np.ndarray:
    """Logits shaped like a small language model's: a Gaussian bulk and a few tokens above it."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
    for r in range(rows):
        head = rng.choice(vocab, 16, replace=False)
        x[r, head] = x[r].max() + rng.uniform(0, 12) * rng.uniform(0, 1, 16) ** 2
    return x


SMALL = (np.random.default_rng(1).standard_normal(40) * 1.5).astype(np.float32)


# ---- distributions -------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.7, top_k=7),
    SamplingParams(top_p=0.7),
    SamplingParams(temperature=0.8, min_p=0.12),
    SamplingParams(temperature=1.3, top_k=12, top_p=0.8),
    SamplingParams(top_p=0.9, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.85, min_p=0.05),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-minp{p.min_p}")
def test_frequencies_match_the_filtered_softmax(params):
    assert_draws_follow(SMALL, params)


def test_penalties_and_bias_shape_the_distribution():
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.6, presence_penalty=0.4,
                            frequency_penalty=0.3, logit_bias={3: 1.5, 17: -2.0, 39: 0.7})
    assert_draws_follow(SMALL, params, history=(3, 5, 5, 17, 20, 20, 20, 31))


@pytest.mark.parametrize("params", [
    SamplingParams(top_p=0.9),                    # a nucleus far wider than the first candidates
    SamplingParams(temperature=0.7, min_p=0.02),  # likewise for min-p
    SamplingParams(temperature=1.2),              # every token: the whole-row draw
    SamplingParams(top_k=300, top_p=0.97),
], ids=["wide-top-p", "wide-min-p", "unfiltered", "top-k-300"])
def test_frequencies_on_a_wide_vocabulary(params):
    row = lm_like(1, 6000, seed=3, spread=1.0)[0]
    assert (reference(row, params) > 0).sum() > 4 * sampling.CPU_CANDIDATES
    assert_draws_follow(row, params, n=6000)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8), SamplingParams(top_k=9),
                                    SamplingParams(top_p=0.75), SamplingParams(min_p=0.1)])
def test_the_draw_inverts_the_cumulative_distribution_in_id_order(params):
    seeded = [dataclasses.replace(params, seed=seed) for seed in range(500)]
    tokens, *_ = sample(np.tile(SMALL, (500, 1)), seeded, np.full(500, 11))
    cdf = np.cumsum(reference(SMALL, params))
    u = np.array([_sampling.draw_uniform(seed, 11) for seed in range(500)]) * cdf[-1]
    clear = np.abs(u[:, None] - cdf[None, :]).min(axis=1) > 1e-9   # skip draws on a boundary
    np.testing.assert_array_equal(tokens[clear], np.searchsorted(cdf, u[clear], side="right"))
    assert clear.mean() > 0.99


def test_minus_infinity_is_never_drawn():
    row = SMALL.copy()
    row[::2] = -np.inf
    assert_draws_follow(row, SamplingParams(temperature=1.5), n=4000)


# ---- greedy, logprobs, alternatives --------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1e-7])   # under 1e-5 counts as greedy
def test_greedy_is_the_argmax_with_lowest_id_on_ties(temperature):
    logits = np.round(np.random.default_rng(2).standard_normal((64, 300)), 1).astype(np.float32)
    params = [SamplingParams(temperature=temperature, seed=1)] * 64
    tokens, logprobs, *_ = sample(logits, params, np.zeros(64, int))
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))   # argmax keeps the first maximum
    expected = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)[torch.arange(64), tokens]
    np.testing.assert_allclose(logprobs, expected.numpy(), rtol=0, atol=1e-5)


def test_greedy_follows_the_penalised_logits():
    logits = lm_like(32, 500, seed=4)
    history = [list(np.argsort(-row)[:3]) for row in logits]   # penalise each row's leaders
    params = SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=1.0,
                            logit_bias={7: 5.0})
    tokens, logprobs, *_ = sample(logits, [params] * 32, np.zeros(32, int), history)
    for row, hist, token, logprob in zip(logits, history, tokens, logprobs):
        expected = reference(row, params, hist)
        assert token == expected.argmax()
        assert logprob == pytest.approx(np.log(expected[token]), abs=1e-5)
    assert (tokens != logits.argmax(axis=1)).any()


def test_top_k_one_is_greedy():
    logits = lm_like(200, 1000, seed=5)
    greedy, *_ = sample(logits, [SamplingParams(temperature=0)] * 200, np.zeros(200, int))
    top1, logprobs, *_ = sample(logits, [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(200)],
                            np.arange(200))
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(logprobs, 0.0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.1, top_p=0.9),
    SamplingParams(temperature=0.5, top_k=40, min_p=0.01),
    SamplingParams(min_p=0.001),
], ids=["greedy", "plain", "top-p", "top-k-min-p", "min-p"])
def test_logprobs_and_alternatives_are_exact_on_a_real_sized_vocabulary(params):
    logits = lm_like(24, 49152, seed=6)
    rows = [dataclasses.replace(params, seed=s) for s in range(24)]
    tokens, logprobs, top_ids, top_logprobs = sample(logits, rows, np.arange(24), top_n=5)
    for row, token, logprob, ids, alternatives in zip(logits, tokens, logprobs, top_ids, top_logprobs):
        expected = reference(row, params)
        assert expected[token] > 0
        assert logprob == pytest.approx(np.log(expected[token]), abs=1e-5)
        np.testing.assert_array_equal(ids, np.lexsort((np.arange(len(row)), -row))[:5])
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(alternatives, np.log(expected[ids]), rtol=0, atol=1e-5)


# ---- determinism ---------------------------------------------------------------------------

MIXED = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.8, seed=2),
         SamplingParams(min_p=0.05, seed=3), SamplingParams(temperature=0.7, seed=4),
         SamplingParams(top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=5),
         SamplingParams(temperature=1.4, presence_penalty=0.5, logit_bias={1: 3.0}, seed=6),
         SamplingParams(top_p=0.5, frequency_penalty=1.0, seed=7)]


def mixed_batch(seed: int = 7):
    logits = lm_like(len(MIXED), 3000, seed=seed)
    history = [list(range(r, 40, r + 1)) for r in range(len(MIXED))]
    return logits, history, np.arange(100, 100 + len(MIXED))


def test_a_row_draws_the_same_token_whatever_the_batch_and_its_place_in_it():
    logits, history, positions = mixed_batch()
    tokens, logprobs, *_ = sample(logits, MIXED, positions, history)
    order = np.random.default_rng(0).permutation(len(MIXED))
    shuffled, shuffled_logprobs, *_ = sample(logits[order], [MIXED[i] for i in order], positions[order],
                                         [history[i] for i in order])
    np.testing.assert_array_equal(shuffled, tokens[order])
    np.testing.assert_array_equal(shuffled_logprobs, logprobs[order])
    for r in range(len(MIXED)):
        alone, *_ = sample(logits[r:r + 1], MIXED[r:r + 1], positions[r:r + 1], history[r:r + 1])
        assert alone[0] == tokens[r]
    others, other_history, _ = mixed_batch(seed=8)
    crowd = np.concatenate([others, logits])
    crowded, *_ = sample(crowd, MIXED + MIXED, np.concatenate([positions + 1, positions]),
                        other_history + history)
    np.testing.assert_array_equal(crowded[len(MIXED):], tokens)


def test_one_thread_or_many_give_the_same_tokens():
    logits, history, positions = mixed_batch()
    many = sample(logits, MIXED, positions, history, threads=3)
    one = sample(logits, MIXED, positions, history, threads=1)
    np.testing.assert_array_equal(one.token_ids, many.token_ids)
    np.testing.assert_array_equal(one.logprobs, many.logprobs)


def test_a_position_sampled_again_gives_the_same_token_and_positions_differ():
    logits = np.zeros((200, 3000), dtype=np.float32)   # uniform: each draw shows
    params = SamplingParams(temperature=1.0, seed=1234)
    first, *_ = sample(logits, [params] * 200, np.arange(200))
    again, *_ = sample(logits, [params] * 200, np.arange(200))
    np.testing.assert_array_equal(first, again)
    assert len(set(first.tolist())) > 180   # each position is a fresh draw
    draw = _sampling.draw_uniform
    assert draw(1234, 5) == draw(1234, 5) != draw(1235, 5)


def test_unseeded_rows_take_seeds_from_the_generator():
    logits = np.zeros((64, 3000), dtype=np.float32)
    unseeded = [SamplingParams()] * 64
    first, *_ = sample(logits, unseeded, np.zeros(64, int), generator=np.random.default_rng(5))
    again, *_ = sample(logits, unseeded, np.zeros(64, int), generator=np.random.default_rng(5))
    fresh, *_ = sample(logits, unseeded, np.zeros(64, int))
    np.testing.assert_array_equal(first, again)
    assert (first != fresh).any()
    assert len(set(first.tolist())) > 55   # rows got different seeds
    seeded = SamplingParams().seeded(np.random.default_rng(5))
    assert seeded.seed is not None and seeded.seeded(np.random.default_rng(6)) is seeded


# ---- non-finite logits ---------------------------------------------------------------------

def test_nan_rows_and_all_minus_inf_rows_are_named_in_the_error():
    logits = lm_like(5, 100, seed=11)
    logits[1, 50] = np.nan
    logits[3] = -np.inf
    with pytest.raises(InvalidLogitsError, match=r"NaN logits in rows \[1\].*all -inf.*rows \[3\]") as error:
        sample(logits, [SamplingParams(seed=0)] * 5, np.zeros(5, int))
    assert error.value.rows == [1, 3]


def test_penalties_can_empty_a_row():
    logits = np.full((1, 4), -np.inf, dtype=np.float32)
    logits[0, 2] = -1e38
    with pytest.raises(InvalidLogitsError, match="all -inf"):
        sample(logits, [SamplingParams(seed=0, repetition_penalty=100.0)], [0], [[2]])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_p=0.5),
                                    SamplingParams(min_p=0.3), SamplingParams(top_k=3)])
def test_plus_infinity_wins_with_the_lowest_id(params):
    logits = lm_like(50, 1000, seed=12)
    logits[:, [700, 300, 900]] = np.inf
    tokens, logprobs, ids, alternatives = sample(
        logits, [dataclasses.replace(params, seed=s) for s in range(50)], np.arange(50), top_n=4)
    np.testing.assert_array_equal(tokens, 300)
    np.testing.assert_array_equal(logprobs, 0.0)
    np.testing.assert_array_equal(ids[:, :3], [[300, 700, 900]] * 50)
    np.testing.assert_array_equal(alternatives[:, 0], 0.0)
    assert np.isneginf(alternatives[:, 1:]).all()


# ---- the device path -----------------------------------------------------------------------

def device_cases():
    """Rows of every kind, some of which the candidates cannot settle (wide nuclei, no filter)."""
    logits = np.concatenate([lm_like(40, 5000, seed=13), lm_like(8, 5000, seed=14, spread=1.0)])
    logits[5, :] = np.round(logits[5], 0)                   # ties across the candidate boundary
    kinds = MIXED + [SamplingParams(top_k=1, seed=8), SamplingParams(top_p=0.999, seed=9),
                     SamplingParams(temperature=1e-6, top_p=0.5)]
    params = [dataclasses.replace(kinds[r % len(kinds)], seed=r) for r in range(len(logits))]
    history = [list(range(r % 7, 300, 13)) for r in range(len(logits))]
    return logits, params, np.arange(len(logits)) * 3, history


@pytest.mark.parametrize("candidates", [256, 8])
def test_the_device_path_draws_what_the_whole_row_path_draws(candidates):
    logits, params, positions, history = device_cases()
    host = sample(logits, params, positions, history, top_n=3)
    device = sample_on_device(torch.from_numpy(logits), params, positions, history, top_n=3,
                              candidates=candidates)
    np.testing.assert_array_equal(device.token_ids, host.token_ids)
    np.testing.assert_allclose(device.logprobs, host.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(device.top_ids, host.top_ids)
    np.testing.assert_allclose(device.top_logprobs, host.top_logprobs, rtol=0, atol=1e-5)


def test_the_device_path_finishes_only_what_it_must_from_whole_rows(monkeypatch):
    logits, params, positions, history = device_cases()
    whole_rows = []
    real = sampling._sample_rows
    monkeypatch.setattr(sampling, "_sample_rows",
                        lambda rows, *args: whole_rows.append(len(rows)) or real(rows, *args))
    sample_on_device(torch.from_numpy(logits), params, positions, history, candidates=256)
    assert 0 < whole_rows[0] < len(logits) // 2


def test_the_device_path_reports_nan_rows():
    logits = lm_like(3, 200, seed=15)
    logits[2, 7] = np.nan
    with pytest.raises(InvalidLogitsError) as error:
        sample_on_device(torch.from_numpy(logits), [SamplingParams(top_k=5, seed=0)] * 3, [0, 0, 0])
    assert error.value.rows == [2]


def test_cpu_tensors_are_read_in_place():
    logits = torch.from_numpy(lm_like(4, 300, seed=16))
    assert np.shares_memory(sampling._host_logits(logits), logits.numpy())
    params = [SamplingParams(top_p=0.9, seed=s) for s in range(4)]
    np.testing.assert_array_equal(sample(logits, params, [1, 2, 3, 4]).token_ids,
                                  sample(logits.numpy(), params, [1, 2, 3, 4]).token_ids)


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.0), ("top_k", True), ("top_k", 2**31),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", math.inf),
    ("repetition_penalty", 1e39), ("repetition_penalty", 1e-39), ("repetition_penalty", 100.5),
    ("presence_penalty", 2.5), ("presence_penalty", math.nan),
    ("frequency_penalty", -2.1), ("frequency_penalty", -math.inf),
    ("seed", -1), ("seed", 2**64), ("seed", 3.0),
    ("logit_bias", {5: math.nan}), ("logit_bias", {5: 101.0}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}), ("logit_bias", [(5, 1.0)]),
])
def test_bad_parameters_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


LOGITS = lm_like(2, 50, seed=17)
TWO = [SamplingParams(seed=1), SamplingParams(seed=2)]


@pytest.mark.parametrize("call, message", [
    (lambda: sample(LOGITS.astype(np.float64), TWO, [0, 0]), "float32"),
    (lambda: sample(LOGITS[0], TWO[:1], [0]), "float32"),
    (lambda: sample(LOGITS[:, ::2], TWO, [0, 0]), "C-contiguous"),
    (lambda: sample(LOGITS, TWO[:1], [0, 0]), "1 SamplingParams for 2 rows"),
    (lambda: sample(LOGITS, [TWO[0], {"seed": 2}], [0, 0]), "SamplingParams"),
    (lambda: sample(LOGITS, TWO, [0]), "positions"),
    (lambda: sample(LOGITS, TWO, [0, -1]), "positions"),
    (lambda: sample(LOGITS, TWO, [0.5, 1]), "positions"),
    (lambda: sample(LOGITS, TWO, [0, 0], [[1]]), "histories"),
    (lambda: sample(LOGITS, TWO, [0, 0], [[1], [50]]), "history"),
    (lambda: sample(LOGITS, TWO, [0, 0], [[-1], []]), "history"),
    (lambda: sample(LOGITS, [TWO[0], SamplingParams(logit_bias={50: 1.0})], [0, 0]), "logit_bias"),
    (lambda: sample(LOGITS, TWO, [0, 0], top_n=-1), "top_n"),
    (lambda: sample(LOGITS, TWO, [0, 0], top_n=51), "top_n"),
    (lambda: sample(LOGITS, TWO, [0, 0], threads=0), "threads"),
    (lambda: sample_on_device(torch.from_numpy(LOGITS), TWO, [0, 0], candidates=0), "candidates"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
