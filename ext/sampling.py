"""Sampling: one call turns a batch of logits into one token per row, each row with its own SamplingParams.

The Python face of the Cython core in _sampling.pyx: it checks parameters, packs them into
arrays and reads the results back; the rows are then sampled without the GIL, in parallel.

Order of operations, as in vLLM and Hugging Face transformers:

1. `logit_bias` is added to the logits.
2. Penalties over the row's history (the ids the request generated before): every id in it has
   its logit divided by `repetition_penalty` when positive and multiplied when not, then
   `frequency_penalty` times its count and `presence_penalty` subtracted.
3. Temperature 0 is greedy (so is any under 1e-5, as in vLLM): the highest penalised logit
   wins. Its logprobs are the log-softmax of the penalised logits at temperature 1, the
   filters left out, like the scores transformers reports for greedy search.
4. Otherwise the logits are divided by the temperature, then top-k keeps the k best tokens,
   top-p the smallest top slice holding at least `top_p` of the probability left, and min-p
   drops the tokens less likely than `min_p` times the best one. The token is drawn from what
   is left, renormalised, and its logprob is the log of its probability there.

Ties are broken by token id: of two equal logits the lower id ranks higher, for the greedy
choice and for every filter, so each keeps a well-defined slice of the vocabulary.

Randomness is counter-based. A row's draw u in [0, 1) is a pure function of its seed and its
position (splitmix64, see `_sampling.uniform`), and its token is where u falls in the
cumulative distribution of the kept tokens taken in id order. So a request gets the same
token at the same position whatever else is in the batch and in whatever row, and sampling a
position again gives the same token: a stream can resume on another server. A request without
a seed should get one when it is admitted, from a generator the engine owns
(`params.seeded(generator)`), so that all its positions share it and it can be reported back;
rows still without one when `sample` runs take a fresh seed from `generator` (or from the
operating system's entropy when none is given), a different one on every call.

Non-finite logits: +inf wins: a row holding +inf (after bias and penalties) chooses its
lowest-id +inf token with logprob 0, whatever the temperature. -inf tokens are never chosen.
A row with a NaN, or with nothing but -inf, has no distribution to sample: `sample` raises
InvalidLogitsError naming the rows, so the caller can fail those requests and keep the rest.

Models on an accelerator use `sample_on_device`: penalties and a torch.topk run on the device
and only each row's best logits cross to the host, where the same Cython code finishes. Rows
those candidates cannot settle (a nucleus or min-p set wider than them, or no filter at all)
are finished from their whole row. The tokens are the CPU path's for the same draws: exactly
for greedy, top-k and min-p rows, and for top-p rows too unless a cumulative probability lands
within float rounding of top_p (the device computes the normaliser in its own way).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import sys

import numpy as np

from ringlm.ext import _sampling, default_threads

__all__ = ["SamplingParams", "SampledTokens", "InvalidLogitsError", "sample", "sample_on_device"]

# The best tokens a top-p or min-p row starts from: most rows' nucleus fits (SmolLM2-135M at
# top_p=0.9: nine in ten positions need fewer than 80 tokens); the others are redone from a bound.
CPU_CANDIDATES = 64
# Row threads by default (`sample(threads=...)` overrides it): one on small machines, where an OpenMP
# barrier waits milliseconds for a thread the OS has descheduled, else all cores but two.
THREADS = default_threads()

# repetition_penalty's range: wide enough for any practical use (vLLM and transformers take 1-2),
# narrow enough that logit * penalty and logit / penalty of a real model's logits stay finite.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0

# The parameter table the core reads: one row of float64 per request, columns in its order.
_COLUMNS = _sampling.COLUMN_NAMES
_COLUMN = {name: column for column, name in enumerate(_COLUMNS)}
_TABLE_ROW = struct.Struct(f"{len(_COLUMNS)}d")


class SampledTokens(NamedTuple):
    """One sampler call's result, row by row."""

    token_ids: np.ndarray                # [B] int64: the chosen token
    logprobs: np.ndarray                 # [B] float64: its logprob in the distribution it was drawn from
    top_ids: np.ndarray | None           # [B, top_n] the best-ranked tokens (None when top_n is 0)
    top_logprobs: np.ndarray | None      # [B, top_n] their logprobs (-inf for filtered ones)


class InvalidLogitsError(ValueError):
    """Rows whose logits give no distribution: a NaN, or every logit -inf. `rows` lists them."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def _finite(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _integer(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; the defaults sample from the model's plain softmax."""

    temperature: float = 1.0          # 0 (or under 1e-5): greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        _finite("SamplingParams.temperature", self.temperature, 0.0, math.inf)
        _integer("SamplingParams.top_k", self.top_k, 0, 2**31 - 1)
        _finite("SamplingParams.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _finite("SamplingParams.min_p", self.min_p, 0.0, 1.0)
        # Bounded so a penalised logit stays a float32: 1e39 would turn every repeated logit into
        # inf or NaN, a row with no distribution, reported as if the model had failed.
        _finite("SamplingParams.repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY,
                MAX_REPETITION_PENALTY)
        _finite("SamplingParams.presence_penalty", self.presence_penalty, -2.0, 2.0)
        _finite("SamplingParams.frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _integer("SamplingParams.seed", self.seed, 0, 2**64 - 1)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"SamplingParams.logit_bias must map token ids to numbers, "
                                 f"got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                _integer("SamplingParams.logit_bias token", token, 0, 2**31 - 1)
                _finite("SamplingParams.logit_bias value", bias, -100.0, 100.0)   # OpenAI's range
        # This request's row of the parameter table, packed once: joining bytes costs far
        # less per call than numpy converting Python numbers.
        object.__setattr__(self, "_table_row", _TABLE_ROW.pack(*(getattr(self, name) for name in _COLUMNS)))

    @property
    def uses_penalties(self) -> bool:
        """Whether this request's tokens depend on the ids it generated before."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def seeded(self, generator: np.random.Generator) -> SamplingParams:
        """These parameters with a seed: their own, or a fresh one from `generator`."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=int(generator.integers(0, 2**64, dtype=np.uint64)))


@dataclasses.dataclass
class _Batch:
    """SamplingParams, positions and histories as the arrays _sampling reads."""

    table: np.ndarray            # [B, columns] float64, see _COLUMNS
    seeds: np.ndarray            # [B] uint64
    positions: np.ndarray        # [B] int64
    history_offsets: np.ndarray  # [B + 1] int64: row r's history is history_ids[offsets[r]:offsets[r + 1]]
    history_ids: np.ndarray      # int32
    bias_offsets: np.ndarray     # [B + 1] int64, likewise for logit_bias
    bias_ids: np.ndarray         # int32
    bias_values: np.ndarray      # float32

    def column(self, name: str) -> np.ndarray:
        return self.table[:, _COLUMN[name]]


def _pack(params: Sequence[SamplingParams], positions, history, top_n: int, rows: int, vocab: int,
          generator: np.random.Generator | None) -> _Batch:
    if len(params) != rows:
        raise ValueError(f"got {len(params)} SamplingParams for {rows} rows of logits")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {p!r}")
    _integer("top_n", top_n, 0, vocab)
    table = np.frombuffer(b"".join([p._table_row for p in params]), np.float64).reshape(rows, len(_COLUMNS))
    return _Batch(table, _seeds(params, generator), _positions(positions, rows),
                  *_history(history, rows, vocab), *_logit_bias(params, vocab))


def _seeds(params: Sequence[SamplingParams], generator: np.random.Generator | None) -> np.ndarray:
    """Each row's seed; unseeded rows draw a fresh one (see the module's notes on randomness)."""
    seeds = [p.seed for p in params]
    if None in seeds:
        fresh = iter((generator or np.random.default_rng()).integers(
            0, 2**64, size=seeds.count(None), dtype=np.uint64).tolist())
        seeds = [next(fresh) if seed is None else seed for seed in seeds]
    return np.array(seeds, dtype=np.uint64)


def _positions(positions, rows: int) -> np.ndarray:
    given = np.asarray(positions)
    if given.shape != (rows,) or (rows and (not np.can_cast(given.dtype, np.int64) or given.min() < 0)):
        raise ValueError(f"positions must be {rows} integers in [0, 2**63), got {positions!r}")
    return given.astype(np.int64)


def _history(history, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's previously generated ids as (offsets, ids)."""
    offsets = np.zeros(rows + 1, dtype=np.int64)
    if history is None:
        return offsets, np.zeros(0, dtype=np.int32)
    if len(history) != rows:
        raise ValueError(f"got {len(history)} histories for {rows} rows of logits")
    np.cumsum([len(h) for h in history], out=offsets[1:])
    if offsets[-1] == 0:
        return offsets, np.zeros(0, dtype=np.int32)
    ids = np.concatenate([np.asarray(h).reshape(-1) for h in history if len(h)])
    if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"history ids must be integers in [0, {vocab}), got {ids!r}")
    return offsets, ids.astype(np.int32)


def _logit_bias(params: Sequence[SamplingParams], vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's logit_bias as (offsets, ids, values)."""
    offsets = np.zeros(len(params) + 1, dtype=np.int64)
    biased = [(r, p.logit_bias) for r, p in enumerate(params) if p.logit_bias]
    if not biased:
        return offsets, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    for r, bias in biased:
        offsets[r + 1] = len(bias)
        if max(bias) >= vocab:
            raise ValueError(f"logit_bias of row {r} names token {max(bias)}, outside the "
                             f"vocabulary of {vocab}")
    np.cumsum(offsets, out=offsets)
    ids = np.array([token for _, bias in biased for token in bias], dtype=np.int32)
    values = np.array([value for _, bias in biased for value in bias.values()], dtype=np.float32)
    return offsets, ids, values


def _is_tensor(value) -> bool:
    """Whether value is a torch tensor. torch is imported only where tensors are handled, so code
    that needs just SamplingParams (the scheduler, the request types) never loads it."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _host_logits(logits) -> np.ndarray:
    """The logits as a float32 C-contiguous [B, V] numpy array, never copied."""
    if _is_tensor(logits):
        logits = logits.detach().numpy()
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.ndim != 2:
        raise ValueError("logits must be a float32 [batch, vocab] numpy array or CPU tensor")
    if not logits.flags.c_contiguous:
        raise ValueError("logits must be C-contiguous (a copy here would cost a pass over them)")
    if not 0 < logits.shape[1] < 2**31:
        raise ValueError(f"the vocabulary must hold between 1 and 2**31 - 1 tokens, got {logits.shape[1]}")
    return logits


def _threads(threads: int | None, rows: int) -> int:
    if threads is None:
        return max(1, min(THREADS, rows))
    _integer("threads", threads, 1, 1024)
    return threads


def _sample_rows(logits: np.ndarray, batch: _Batch, top_n: int, threads: int) -> tuple:
    return _sampling.sample_full(
        logits, batch.table, batch.seeds, batch.positions, batch.history_offsets,
        batch.history_ids, batch.bias_offsets, batch.bias_ids, batch.bias_values, top_n,
        CPU_CANDIDATES, threads)


def _results(outputs: tuple, top_n: int) -> SampledTokens:
    token_ids, logprobs, top_ids, top_logprobs, status = outputs
    if status.any():
        _raise_for_invalid_rows(status)
    if top_n:
        return SampledTokens(token_ids, logprobs, top_ids, top_logprobs)
    return SampledTokens(token_ids, logprobs, None, None)


def _raise_for_invalid_rows(status: np.ndarray) -> None:
    nan_rows = np.flatnonzero(status == _sampling.NAN_LOGITS).tolist()
    empty_rows = np.flatnonzero(status == _sampling.NO_FINITE_LOGITS).tolist()
    problems = ([f"NaN logits in rows {nan_rows}"] if nan_rows else []) + (
        [f"no finite logit (all -inf after bias and penalties) in rows {empty_rows}"] if empty_rows else [])
    if problems:
        raise InvalidLogitsError("; ".join(problems), sorted(nan_rows + empty_rows))


def sample(logits, params: Sequence[SamplingParams], positions: Sequence[int] | np.ndarray,
           history: Sequence[Sequence[int]] | None = None, top_n: int = 0, *,
           generator: np.random.Generator | None = None, threads: int | None = None) -> SampledTokens:
    """Sample one token for each row of `logits` ([B, V] float32, a C-contiguous numpy array or
    a CPU tensor, read in place), row r with params[r] at positions[r], penalised by
    history[r] (the ids it generated before; only rows whose params use penalties need one,
    any other row's history is ignored). A tensor on a device goes to sample_on_device.

    Returns SampledTokens: each row's token and logprob and, when top_n > 0, its best-ranked
    tokens with their logprobs in the distribution the token was drawn from.
    Rows are spread over `threads` threads (default: THREADS)."""
    if _is_tensor(logits) and logits.device.type != "cpu":
        return sample_on_device(logits, params, positions, history, top_n, generator=generator,
                                threads=threads)
    logits = _host_logits(logits)
    batch = _pack(params, positions, history, top_n, *logits.shape, generator)
    return _results(_sample_rows(logits, batch, top_n, _threads(threads, len(logits))), top_n)


def sample_on_device(logits: torch.Tensor, params: Sequence[SamplingParams],
                     positions: Sequence[int] | np.ndarray,
                     history: Sequence[Sequence[int]] | None = None, top_n: int = 0, *,
                     generator: np.random.Generator | None = None, threads: int | None = None,
                     candidates: int = 256) -> SampledTokens:
    """`sample` for logits on an accelerator (any torch device, the CPU included): penalise
    and take each row's best `candidates` tokens there (top_k's own k where it is smaller),
    copy only those to the host and finish in Cython; rows they cannot settle are finished
    from their whole penalised row. Same arguments and results as `sample`."""
    if not _is_tensor(logits) or logits.ndim != 2 or 0 in logits.shape:
        raise ValueError("logits must be a [batch, vocab] tensor")
    _integer("candidates", candidates, 1, 2**31 - 1)
    rows, vocab = logits.shape
    batch = _pack(params, positions, history, top_n, rows, vocab, generator)
    threads = _threads(threads, rows)
    penalised = _penalise_on_device(logits.detach().float(), batch)
    outputs = _sampling.sample_candidates(*_reduce_on_device(penalised, batch, top_n, candidates),
                                          vocab, batch.table, batch.seeds, batch.positions, top_n,
                                          threads)
    _finish_whole_rows(outputs, penalised, batch, top_n, threads)
    return _results(outputs, top_n)


def _penalise_on_device(logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """The device twin of _sampling.penalise: the same float32 operations in the same order."""
    import torch

    if not len(batch.bias_ids) and not len(batch.history_ids):
        return logits
    device = logits.device
    penalised = logits.clone()
    if len(batch.bias_ids):
        where = _entries(batch.bias_offsets, batch.bias_ids, device)
        penalised.index_put_(where, torch.from_numpy(batch.bias_values).to(device), accumulate=True)
    if len(batch.history_ids):
        counts = torch.zeros_like(penalised)
        counts.index_put_(_entries(batch.history_offsets, batch.history_ids, device),
                          torch.ones(len(batch.history_ids), device=device), accumulate=True)
        repetition, presence, frequency = (
            torch.from_numpy(batch.column(name).astype(np.float32)).to(device)[:, None]
            for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        repeated = torch.where(penalised > 0, penalised / repetition, penalised * repetition)
        penalised = torch.where(counts > 0, (repeated - frequency * counts) - presence, penalised)
    return penalised


def _entries(offsets: np.ndarray, ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A ragged per-row array of token ids as (rows, ids) index tensors."""
    import torch

    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return torch.from_numpy(rows).to(device), torch.from_numpy(ids).long().to(device)


def _reduce_on_device(penalised: torch.Tensor, batch: _Batch, top_n: int, candidates: int) -> tuple:
    """What crosses to the host: each row's best k logits and their ids (torch.topk, k the
    most any row needs, plus one to see where ties end), log sum exp(y / T) over the whole
    row (temperature 1 for greedy rows), and which rows hold a NaN."""
    import torch

    vocab = penalised.shape[1]
    temperature = batch.column("temperature")
    greedy = temperature < _sampling.GREEDY_TEMPERATURE
    top_k = batch.column("top_k")
    top_k = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
    filtered = (batch.column("top_p") < 1) | (batch.column("min_p") > 0)
    need = np.where(greedy, 1, np.where(top_k > 0, top_k, np.where(filtered, candidates, 1)))
    k = min(vocab, int(max(need.max(), top_n)) + 1)
    values, ids = torch.topk(penalised, k, dim=1)
    inv_t = torch.from_numpy(np.divide(1.0, temperature, out=np.ones_like(temperature), where=~greedy))
    log_norms = torch.logsumexp(penalised.double() * inv_t.to(penalised.device)[:, None], dim=1)
    nan_rows = torch.isnan(penalised).any(dim=1).to(torch.uint8)
    return (values.cpu().numpy(), ids.to(torch.int32).cpu().numpy(), log_norms.cpu().numpy(),
            nan_rows.cpu().numpy())


def _finish_whole_rows(outputs: tuple, penalised: torch.Tensor, batch: _Batch, top_n: int,
                       threads: int) -> None:
    """Redo, from their whole penalised rows, the rows the device's candidates left open."""
    import torch

    rows = np.flatnonzero(outputs[-1] == _sampling.NEEDS_FULL_ROW)
    if not len(rows):
        return
    whole = penalised[torch.from_numpy(rows).to(penalised.device)].cpu().numpy()
    no_history = np.zeros(len(rows) + 1, dtype=np.int64)   # penalties are in `whole` already
    redone = dataclasses.replace(
        batch, table=batch.table[rows], seeds=batch.seeds[rows], positions=batch.positions[rows],
        history_offsets=no_history, history_ids=np.zeros(0, np.int32), bias_offsets=no_history,
        bias_ids=np.zeros(0, np.int32), bias_values=np.zeros(0, np.float32))
    for mine, theirs in zip(outputs, _sample_rows(whole, redone, top_n, threads)):
        mine[rows] = theirs
