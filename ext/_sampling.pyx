# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batched sampling core: [B, V] float32 logits in, one token per row out, rows in parallel without the GIL.

sampling.py states the rules (order of operations, draws, non-finite logits) and packs the
parameters; this file is the arithmetic, with the passes over all V logits in _sampling_simd.h.
Every row goes through `sample_row`, whether it comes as a whole row of the vocabulary
(`sample_full`) or as its best candidates reduced on a device (`sample_candidates`), so both
paths choose the same tokens for the same draws.

Ranking: a token outranks another when its logit is larger, or equal with a lower id. Every set
we keep (top-k, nucleus, min-p) is a top slice of the row in this order, and the draw walks the
kept tokens in id order, so it does not depend on how the set was found.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, exp, log
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy

import numpy as np

cdef extern from "<algorithm>" namespace "std" nogil:
    void std_sort "std::sort"[Iter, Compare](Iter first, Iter last, Compare comp)
    void nth_element "std::nth_element"[Iter, Compare](Iter first, Iter nth, Iter last, Compare comp)

cdef extern from "_sampling_simd.h" nogil:
    enum:
        MAX_BLOCK "RINGLM_MAX_BLOCK"
        SUM_BLOCK "RINGLM_SUM_BLOCK"
    bint block_maxima "ringlm_block_maxima"(const float* y, Py_ssize_t n, float* out)
    double scan "ringlm_scan"(const float* y, Py_ssize_t n, float scale, float* block_max,
                              double* block_sums, float* top, int* has_nan)
    void exp2_each "ringlm_exp"(const float* y, Py_ssize_t n, float m, float scale, float* out)

# Row outcomes; sampling.py turns them into exceptions or a second, whole-row pass.
cdef enum:
    STATUS_OK = 0
    STATUS_NAN = 1              # a NaN logit
    STATUS_NO_FINITE = 2        # every logit is -inf
    STATUS_NEEDS_FULL_ROW = 3   # the candidates do not settle the row (device path only)
    STATUS_NO_MEMORY = 4

NAN_LOGITS = STATUS_NAN
NO_FINITE_LOGITS = STATUS_NO_FINITE
NEEDS_FULL_ROW = STATUS_NEEDS_FULL_ROW

# Columns of the per-row parameter table, which sampling.py builds from SamplingParams fields.
cdef enum:
    TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, COLUMNS

COLUMN_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty")

cdef double LOG2E = 1.4426950408889634
# Temperatures under this are greedy, as in vLLM: 1 / T would overflow the exponent arithmetic.
cdef double GREEDY_BELOW = 1e-5
GREEDY_TEMPERATURE = GREEDY_BELOW

cdef struct Cand:
    float y         # penalised logit
    int32_t id
    double e        # exp((y - row max) / T)

cdef struct Row:
    const float* y
    const int32_t* ids  # NULL: y[i] is token i (a whole row); else the ids of device candidates
    Py_ssize_t n
    Py_ssize_t vocab
    double log_norm     # candidates: log sum_v exp(y_v * inv_t) over the whole row, from the device
    double weight       # sum_v exp((y_v - max) * inv_t) over the whole row, once known

cdef struct Params:
    bint greedy
    double inv_t        # 1 / temperature (1 for greedy rows, whose logprobs use temperature 1)
    Py_ssize_t top_k    # 0: off (also when >= vocab)
    double top_p        # 1: off
    double log_min_p    # -inf: off
    float repetition, presence, frequency
    double u            # the row's uniform draw

cdef struct Scratch:
    float* row          # the penalised copy of a row
    int32_t* counts     # history counts per token, back to zero after every row
    float* block_max    # the row's block maxima
    float* order        # a copy of them for nth_element
    Py_ssize_t capacity # of the next three, grown as rows need
    Cand* cands
    float* values       # logits in, for the vector exp
    float* exps         # their exponentials out
    double* block_sums
    Cand* alternatives


# ---- counter-based draws -------------------------------------------------------------------

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """splitmix64's finaliser: a bijection of 64-bit words in which every input bit flips about
    half of the output bits."""
    x = (x ^ (x >> 30)) * <uint64_t>0xbf58476d1ce4e5b9ULL
    x = (x ^ (x >> 27)) * <uint64_t>0x94d049bb133111ebULL
    return x ^ (x >> 31)


cdef inline double uniform(uint64_t seed, uint64_t position) noexcept nogil:
    """The draw in [0, 1) for (seed, position): output number `position` of a splitmix64 stream
    that starts at mix64(seed). Nothing else enters, so batching never changes a draw."""
    cdef uint64_t state = mix64(seed) + (position + 1) * <uint64_t>0x9e3779b97f4a7c15ULL
    return <double>(mix64(state) >> 11) * (1.0 / 9007199254740992.0)


def draw_uniform(uint64_t seed, uint64_t position) -> float:
    """The uniform draw a row with this seed gets at this position (for tests and tools)."""
    return uniform(seed, position)


# ---- ranked selection ----------------------------------------------------------------------

cdef inline bint outranks(float ya, int32_t ida, float yb, int32_t idb) noexcept nogil:
    return ya > yb or (ya == yb and ida < idb)


cdef inline bint cand_outranks(const Cand& a, const Cand& b) noexcept nogil:
    return outranks(a.y, a.id, b.y, b.id)


cdef inline bint lower_id(const Cand& a, const Cand& b) noexcept nogil:
    return a.id < b.id


cdef inline bint higher(float a, float b) noexcept nogil:
    return a > b


cdef inline void swap(Cand* c, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef Cand t = c[i]
    c[i] = c[j]
    c[j] = t


cdef void sift_down(Cand* heap, Py_ssize_t size, Py_ssize_t i) noexcept nogil:
    """Restore the heap below i; the root is the weakest member."""
    cdef Py_ssize_t weakest, child
    while True:
        weakest = i
        for child in range(2 * i + 1, min(2 * i + 3, size)):
            if cand_outranks(heap[weakest], heap[child]):
                weakest = child
        if weakest == i:
            return
        swap(heap, i, weakest)
        i = weakest


cdef void sift_up(Cand* heap, Py_ssize_t i) noexcept nogil:
    while i > 0 and cand_outranks(heap[(i - 1) // 2], heap[i]):
        swap(heap, i, (i - 1) // 2)
        i = (i - 1) // 2


cdef inline Py_ssize_t blocks_of(Py_ssize_t n) noexcept nogil:
    return (n + MAX_BLOCK - 1) // MAX_BLOCK


cdef Py_ssize_t select_top(const Row* row, Py_ssize_t k, Scratch* s) noexcept nogil:
    """Put the row's k best-ranked tokens in s.cands[0:k], best first; return how many there
    are (fewer only when the row is shorter). Needs s.block_max.

    The k-th largest block maximum is a bar the top k all clear (k logits reach it), so only
    the blocks that reach it are read; in them a min-heap of the best so far, which raises
    the bar as it fills, costs one comparison per logit."""
    cdef Py_ssize_t blocks = blocks_of(row.n), size = 0, b, i
    cdef float bar = -INFINITY, v
    cdef int32_t token
    cdef Cand* heap = s.cands
    if k <= blocks:
        memcpy(s.order, s.block_max, blocks * sizeof(float))
        nth_element(s.order, s.order + k - 1, s.order + blocks, higher)
        bar = s.order[k - 1]
    for b in range(blocks):
        if s.block_max[b] < bar:
            continue
        for i in range(b * MAX_BLOCK, min((b + 1) * MAX_BLOCK, row.n)):
            v = row.y[i]
            if not v >= bar:
                continue
            token = row.ids[i] if row.ids != NULL else <int32_t>i
            if size < k:
                heap[size].y = v
                heap[size].id = token
                size += 1
                sift_up(heap, size - 1)
            elif outranks(v, token, heap[0].y, heap[0].id):
                heap[0].y = v
                heap[0].id = token
                sift_down(heap, size, 0)
            if size == k:
                bar = heap[0].y
    for i in range(size - 1, 0, -1):   # heap sort: the weakest goes to the back
        swap(heap, 0, i)
        sift_down(heap, i, 0)
    return size


cdef bint reserve(Scratch* s, Py_ssize_t n) noexcept nogil:
    """Room for n candidates (and their weights) in s; False when memory runs out."""
    cdef Cand* cands
    cdef float* values
    cdef float* exps
    if n <= s.capacity:
        return True
    n = max(n, 2 * s.capacity)
    cands = <Cand*>realloc(s.cands, n * sizeof(Cand))
    if cands != NULL:
        s.cands = cands
    values = <float*>realloc(s.values, n * sizeof(float))
    if values != NULL:
        s.values = values
    exps = <float*>realloc(s.exps, n * sizeof(float))
    if exps != NULL:
        s.exps = exps
    if cands == NULL or values == NULL or exps == NULL:
        return False
    s.capacity = n
    return True


cdef Py_ssize_t collect(const Row* row, float lowest, Scratch* s) noexcept nogil:
    """Copy every token with y >= lowest to s.cands, in row order; return how many (-1 when
    memory runs out)."""
    cdef Py_ssize_t n = 0, blocks = 0, b, i
    for b in range(blocks_of(row.n)):
        blocks += s.block_max[b] >= lowest
    if not reserve(s, blocks * MAX_BLOCK):
        return -1
    for b in range(blocks_of(row.n)):
        if s.block_max[b] < lowest:
            continue
        for i in range(b * MAX_BLOCK, min((b + 1) * MAX_BLOCK, row.n)):
            s.cands[n].y = row.y[i]
            s.cands[n].id = row.ids[i] if row.ids != NULL else <int32_t>i
            n += row.y[i] >= lowest
    return n


cdef inline float exp2_scale(double inv_t) noexcept nogil:
    """The factor that turns y - m into a power of two: exp(x / T) = 2**(x * log2(e) / T)."""
    return <float>(inv_t * LOG2E)


cdef void set_weights(Cand* c, Py_ssize_t n, float m, double inv_t, Scratch* s) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        s.values[i] = c[i].y
    exp2_each(s.values, n, m, exp2_scale(inv_t), s.exps)
    for i in range(n):
        c[i].e = s.exps[i]


cdef Py_ssize_t take_mass(Cand* c, Py_ssize_t n, double target, bint* reached) noexcept nogil:
    """Move the smallest top-ranked slice of c[0:n] that holds `target` weight to the front and
    return its size (n, with *reached False, when all of c holds less).

    Quickselect steered by weight instead of count: linear on average, and no sort."""
    cdef Py_ssize_t lo = 0, hi = n, store, i
    cdef double above = 0.0, mass
    cdef Cand pivot
    reached[0] = True
    while lo < hi:
        swap(c, (lo + hi) // 2, hi - 1)
        pivot = c[hi - 1]
        store = lo
        mass = 0.0
        for i in range(lo, hi - 1):
            if cand_outranks(c[i], pivot):
                swap(c, i, store)
                mass += c[store].e
                store += 1
        swap(c, store, hi - 1)
        if above + mass >= target:
            hi = store
        elif above + mass + pivot.e >= target:
            return store + 1
        else:
            above += mass + pivot.e
            lo = store + 1
    reached[0] = False
    return n


cdef Py_ssize_t keep_at_least(Cand* c, Py_ssize_t n, float lowest) noexcept nogil:
    """Keep the entries with y >= lowest, in order; return how many."""
    cdef Py_ssize_t kept = 0, i
    for i in range(n):
        if c[i].y >= lowest:
            c[kept] = c[i]
            kept += 1
    return kept


# ---- one row ---------------------------------------------------------------------------------

cdef const float* penalise(const float* logits, Py_ssize_t vocab, const Params* p,
                           const int32_t* history, Py_ssize_t history_len,
                           const int32_t* bias_ids, const float* bias_values, Py_ssize_t bias_len,
                           Scratch* s) noexcept nogil:
    """The row with logit bias, then repetition, frequency and presence penalties applied (on a
    copy, so the caller's logits stay as they were); the row itself when none apply."""
    cdef bint penalties = history_len > 0 and (
        p.repetition != 1.0 or p.presence != 0.0 or p.frequency != 0.0)
    cdef Py_ssize_t i
    cdef int32_t token, count
    cdef float y
    if not penalties and bias_len == 0:
        return logits
    memcpy(s.row, logits, vocab * sizeof(float))
    for i in range(bias_len):
        s.row[bias_ids[i]] += bias_values[i]
    if penalties:
        for i in range(history_len):
            s.counts[history[i]] += 1
        for i in range(history_len):
            token = history[i]
            count = s.counts[token]
            if count == 0:
                continue   # already penalised
            y = s.row[token]
            y = y / p.repetition if y > 0 else y * p.repetition
            s.row[token] = (y - p.frequency * <float>count) - p.presence
            s.counts[token] = 0
    return s.row


cdef inline float min_p_floor(float m, const Params* p) noexcept nogil:
    """The lowest logit min-p keeps (exp((y - m) / T) >= min_p), computed once per row in the
    same way on every path so they agree at the boundary."""
    return <float>(m + p.log_min_p / p.inv_t)


cdef Py_ssize_t draw_kept(Cand* kept, Py_ssize_t n, double u, double* z) noexcept nogil:
    """Index of the kept token the draw lands on, walking in id order; *z gets their weight."""
    cdef Py_ssize_t i, last = 0
    cdef double total = 0.0, cum = 0.0, target
    std_sort(kept, kept + n, lower_id)
    for i in range(n):
        total += kept[i].e
    target = u * total
    for i in range(n):
        if kept[i].e > 0:
            last = i
            cum += kept[i].e
            if cum > target:
                break
    z[0] = total
    return last


cdef int32_t draw_row(const Row* row, float m, double inv_t, double u, Scratch* s) noexcept nogil:
    """The token the draw lands on when a whole row is kept: walk the block sums the first
    pass left in s.block_sums in id order, then the tokens of one block."""
    cdef float scale = exp2_scale(inv_t)
    cdef Py_ssize_t blocks = (row.n + SUM_BLOCK - 1) // SUM_BLOCK, b, chosen = 0, i, start, last
    cdef double target = u * row.weight, cum = 0.0
    for b in range(blocks):
        if s.block_sums[b] > 0:
            chosen = b
        if cum + s.block_sums[b] > target:
            break
        cum += s.block_sums[b]
    start = chosen * SUM_BLOCK
    exp2_each(row.y + start, min(SUM_BLOCK, row.n - start), m, scale, s.exps)
    last = start
    for i in range(min(SUM_BLOCK, row.n - start)):
        if s.exps[i] > 0:    # rounding may leave the target unreached: end on a live token
            last = start + i
            cum += s.exps[i]
            if cum > target:
                break
    return <int32_t>last


cdef int kept_set(Row* row, const Params* p, Scratch* s, Py_ssize_t n, float m,
                  Py_ssize_t* size) noexcept nogil:
    """Apply top-k, top-p and min-p to the row's n best-ranked tokens in s.cands, leaving the
    *size kept ones in front; return a status (NEEDS_FULL_ROW when tokens beyond the device's
    candidates might belong).

    With top-k on, the candidates are the top-k. Otherwise they are a budget of best tokens,
    which settles most rows; a whole row it does not settle is redone from every token that
    can matter."""
    cdef bint reached = True
    cdef double z = 0.0
    cdef Py_ssize_t i
    if p.top_k:
        n = min(p.top_k, n)
    set_weights(s.cands, n, m, p.inv_t, s)
    if p.top_p < 1.0:
        if p.top_k:
            for i in range(n):
                z += s.cands[i].e
        else:
            z = row.weight
        n = take_mass(s.cands, n, p.top_p * z, &reached)
        if not reached and not p.top_k:
            if row.ids != NULL:
                return STATUS_NEEDS_FULL_ROW
            # The tokens under (1 - top_p) * z / vocab in weight hold less than 1 - top_p
            # together, so the nucleus needs none of them; half that bound leaves room for rounding.
            n = collect(row, <float>(m + log((1.0 - p.top_p) * z / (2.0 * row.n)) / p.inv_t), s)
            if n < 0:
                return STATUS_NO_MEMORY
            set_weights(s.cands, n, m, p.inv_t, s)
            n = take_mass(s.cands, n, p.top_p * z, &reached)
    elif p.log_min_p > -INFINITY and not p.top_k and s.cands[n - 1].y >= min_p_floor(m, p):
        # The weakest candidate passes min-p, so tokens after it may pass too.
        if row.ids != NULL:
            return STATUS_NEEDS_FULL_ROW
        n = collect(row, min_p_floor(m, p), s)
        if n < 0:
            return STATUS_NO_MEMORY
        set_weights(s.cands, n, m, p.inv_t, s)
    if p.log_min_p > -INFINITY:
        n = keep_at_least(s.cands, n, min_p_floor(m, p))
    size[0] = n
    return STATUS_OK


cdef inline double log_weight(float y, float m, double inv_t) noexcept nogil:
    """log exp((y - m) * inv_t), with the best token at 0 even when it is +inf."""
    return 0.0 if y == m else (<double>y - m) * inv_t


cdef bint first_pass(Row* row, const Params* p, bint whole_weight, Scratch* s) noexcept nogil:
    """Block maxima into s.block_max, and for a whole row that needs it its weight (with the
    block sums in s.block_sums); return whether the row holds a NaN."""
    cdef int has_nan = False
    cdef float top
    if whole_weight and row.ids == NULL:
        row.weight = scan(row.y, row.n, exp2_scale(p.inv_t), s.block_max, s.block_sums, &top, &has_nan)
        return has_nan
    return block_maxima(row.y, row.n, s.block_max)


cdef int sample_row(Row* row, const Params* p, Py_ssize_t top_n, Py_ssize_t budget,
                    Scratch* s, int64_t* token, double* logprob, int64_t* top_ids,
                    double* top_logprobs) noexcept nogil:
    """Choose one row's token, its logprob and its top-n alternatives; return a status."""
    cdef int status
    cdef bint unfiltered = not p.greedy and not p.top_k and p.top_p >= 1.0 and p.log_min_p == -INFINITY
    cdef bint whole_weight = p.greedy or unfiltered or (p.top_p < 1.0 and not p.top_k)
    cdef Py_ssize_t exact = max(1, p.top_k, top_n), n, kept, i, chosen
    cdef Py_ssize_t want = exact if p.greedy or unfiltered or p.top_k else max(exact, min(budget, row.n))
    cdef double z
    cdef float m, chosen_y
    if not reserve(s, max(want, SUM_BLOCK)):
        return STATUS_NO_MEMORY
    if first_pass(row, p, whole_weight, s):
        return STATUS_NAN
    n = select_top(row, want, s)
    if n < exact:   # candidates only: a whole row is never shorter than top_k or top_n
        return STATUS_NEEDS_FULL_ROW
    m = s.cands[0].y
    if m == -INFINITY:
        return STATUS_NO_FINITE
    if row.ids != NULL:
        row.weight = exp(row.log_norm - m * p.inv_t)
    memcpy(s.alternatives, s.cands, top_n * sizeof(Cand))
    if m == INFINITY:     # a point mass on the best-ranked +inf token
        token[0], chosen_y, kept, z = s.cands[0].id, m, 1, 1.0
    elif p.greedy:
        token[0], chosen_y, kept, z = s.cands[0].id, m, row.vocab, row.weight
    elif unfiltered:
        if row.ids != NULL:
            return STATUS_NEEDS_FULL_ROW
        token[0] = draw_row(row, m, p.inv_t, p.u, s)
        chosen_y, kept, z = row.y[token[0]], row.vocab, row.weight
    else:
        status = kept_set(row, p, s, n, m, &kept)
        if status != STATUS_OK:
            return status
        chosen = draw_kept(s.cands, kept, p.u, &z)
        token[0], chosen_y = s.cands[chosen].id, s.cands[chosen].y
    logprob[0] = log_weight(chosen_y, m, p.inv_t) - log(z)
    # The kept set is the row's top `kept` tokens in rank order, so rank decides membership.
    for i in range(top_n):
        top_ids[i] = s.alternatives[i].id
        top_logprobs[i] = log_weight(s.alternatives[i].y, m, p.inv_t) - log(z) if i < kept else -INFINITY
    return STATUS_OK


# ---- the batch -----------------------------------------------------------------------------

cdef struct Batch:
    const float* logits         # [rows, width]: whole rows, or device candidates' logits
    const int32_t* cand_ids     # [rows, width] candidate ids; NULL for whole rows
    const double* log_norms     # [rows] candidates: log sum exp(y * inv_t) over the whole row
    const unsigned char* nan_rows
    Py_ssize_t width, vocab, top_n, budget
    bint penalised              # some row has a history or a logit bias
    const double* table         # [rows, COLUMNS]
    const uint64_t* seeds
    const int64_t* positions
    const int64_t* history_offsets
    const int32_t* history_ids
    const int64_t* bias_offsets
    const int32_t* bias_ids
    const float* bias_values
    int64_t* token_ids
    double* logprobs
    int64_t* top_ids
    double* top_logprobs


cdef Params row_params(const Batch* b, Py_ssize_t r) noexcept nogil:
    cdef const double* t = b.table + r * COLUMNS
    cdef Params p
    p.greedy = t[TEMPERATURE] < GREEDY_BELOW
    p.inv_t = 1.0 if p.greedy else 1.0 / t[TEMPERATURE]
    p.top_k = <Py_ssize_t>t[TOP_K] if 0 < t[TOP_K] < b.vocab else 0
    p.top_p = t[TOP_P]
    p.log_min_p = log(t[MIN_P]) if t[MIN_P] > 0.0 else -INFINITY
    p.repetition = <float>t[REPETITION]
    p.presence = <float>t[PRESENCE]
    p.frequency = <float>t[FREQUENCY]
    p.u = uniform(b.seeds[r], <uint64_t>b.positions[r])
    return p


cdef int batch_row(const Batch* b, Py_ssize_t r, Scratch* s) noexcept nogil:
    cdef Params p = row_params(b, r)
    cdef Row row
    cdef const float* values = b.logits + r * b.width
    cdef Py_ssize_t h0, h1, b0, b1
    row.vocab = b.vocab
    if b.cand_ids == NULL:
        h0, h1 = b.history_offsets[r], b.history_offsets[r + 1]
        b0, b1 = b.bias_offsets[r], b.bias_offsets[r + 1]
        row.y = penalise(values, b.vocab, &p, b.history_ids + h0, h1 - h0,
                         b.bias_ids + b0, b.bias_values + b0, b1 - b0, s)
        row.ids = NULL
        row.n, row.log_norm = b.vocab, 0.0   # whole rows find their own weight
    else:
        if b.nan_rows[r]:
            return STATUS_NAN
        # Device candidates come sorted by logit, ties in any order: drop the last tie group,
        # which may be cut short, so the rest is exactly the row's tokens above a value.
        row.y, row.ids, row.n, row.log_norm = values, b.cand_ids + r * b.width, b.width, b.log_norms[r]
        while row.n > 0 and values[row.n - 1] == values[b.width - 1]:
            row.n -= 1
    return sample_row(&row, &p, b.top_n, b.budget, s, b.token_ids + r, b.logprobs + r,
                      b.top_ids + r * b.top_n, b.top_logprobs + r * b.top_n)


cdef void scratch_free(Scratch* s) noexcept nogil:
    if s != NULL:
        free(s.row)
        free(s.counts)
        free(s.block_max)
        free(s.order)
        free(s.values)
        free(s.exps)
        free(s.block_sums)
        free(s.cands)
        free(s.alternatives)
        free(s)


cdef Scratch* scratch_new(const Batch* b) noexcept nogil:
    """One thread's working memory; NULL when it cannot be had. Candidate buffers start empty
    and grow with the rows (see reserve)."""
    cdef Scratch* s = <Scratch*>calloc(1, sizeof(Scratch))
    if s == NULL:
        return NULL
    s.block_max = <float*>malloc(blocks_of(b.width) * sizeof(float))
    s.order = <float*>malloc(blocks_of(b.width) * sizeof(float))
    s.block_sums = <double*>malloc((b.width // SUM_BLOCK + 1) * sizeof(double))
    s.alternatives = <Cand*>malloc(max(b.top_n, 1) * sizeof(Cand))
    if b.penalised:   # a copy of the row to penalise, and a history count per token
        s.row = <float*>malloc(b.vocab * sizeof(float))
        s.counts = <int32_t*>calloc(b.vocab, sizeof(int32_t))
    if (s.block_max == NULL or s.order == NULL or s.block_sums == NULL or s.alternatives == NULL
            or (b.penalised and (s.row == NULL or s.counts == NULL))):
        scratch_free(s)
        return NULL
    return s


cdef object run(Batch* b, Py_ssize_t rows, int threads):
    """Sample every row, `threads` at a time; return the outputs and the status of each row."""
    token_ids = np.zeros(rows, dtype=np.int64)
    logprobs = np.zeros(rows, dtype=np.float64)
    top_ids = np.zeros((rows, b.top_n), dtype=np.int64)
    top_logprobs = np.zeros((rows, b.top_n), dtype=np.float64)
    status = np.zeros(rows, dtype=np.int32)
    cdef int64_t[::1] token_view = token_ids
    cdef double[::1] logprob_view = logprobs
    cdef int64_t[:, ::1] top_id_view = top_ids
    cdef double[:, ::1] top_logprob_view = top_logprobs
    cdef int32_t[::1] status_view = status
    cdef Scratch* s = NULL
    cdef Py_ssize_t r
    if rows == 0:
        return token_ids, logprobs, top_ids, top_logprobs, status
    b.token_ids = &token_view[0]
    b.logprobs = &logprob_view[0]
    b.top_ids = &top_id_view[0, 0] if b.top_n else NULL
    b.top_logprobs = &top_logprob_view[0, 0] if b.top_n else NULL
    with nogil, parallel(num_threads=threads):
        s = scratch_new(b)
        for r in prange(rows, schedule="dynamic"):
            status_view[r] = batch_row(b, r, s) if s != NULL else STATUS_NO_MEMORY
        scratch_free(s)
    if (status == STATUS_NO_MEMORY).any():
        raise MemoryError("no memory for the sampler's working buffers")
    return token_ids, logprobs, top_ids, top_logprobs, status


def sample_full(const float[:, ::1] logits, const double[:, ::1] table, const uint64_t[::1] seeds,
                const int64_t[::1] positions, const int64_t[::1] history_offsets,
                const int32_t[::1] history_ids, const int64_t[::1] bias_offsets,
                const int32_t[::1] bias_ids, const float[::1] bias_values,
                Py_ssize_t top_n, Py_ssize_t budget, int threads):
    """Sample whole rows (the CPU path); history and logit bias are ragged (offsets, values).
    Returns (token_ids, logprobs, top_ids, top_logprobs, status)."""
    cdef Batch b
    b.logits = &logits[0, 0]
    b.cand_ids = NULL
    b.width = b.vocab = logits.shape[1]
    b.top_n, b.budget = top_n, budget
    b.table, b.seeds, b.positions = &table[0, 0], &seeds[0], &positions[0]
    b.history_offsets, b.bias_offsets = &history_offsets[0], &bias_offsets[0]
    b.penalised = history_ids.shape[0] > 0 or bias_ids.shape[0] > 0
    b.history_ids = &history_ids[0] if history_ids.shape[0] else NULL
    b.bias_ids = &bias_ids[0] if bias_ids.shape[0] else NULL
    b.bias_values = &bias_values[0] if bias_values.shape[0] else NULL
    return run(&b, logits.shape[0], threads)


def sample_candidates(const float[:, ::1] values, const int32_t[:, ::1] ids,
                      const double[::1] log_norms, const unsigned char[::1] nan_rows,
                      Py_ssize_t vocab, const double[:, ::1] table, const uint64_t[::1] seeds,
                      const int64_t[::1] positions, Py_ssize_t top_n, int threads):
    """Finish rows a device reduced to their best candidates, already penalised and sorted by
    logit (torch.topk), with each row's log-normaliser. Rows the candidates cannot settle come
    back with status NEEDS_FULL_ROW. Returns (token_ids, logprobs, top_ids, top_logprobs, status)."""
    cdef Batch b
    b.logits, b.cand_ids = &values[0, 0], &ids[0, 0]
    b.log_norms, b.nan_rows = &log_norms[0], &nan_rows[0]
    b.width, b.vocab = values.shape[1], vocab
    b.top_n, b.budget, b.penalised = top_n, values.shape[1], False
    b.table, b.seeds, b.positions = &table[0, 0], &seeds[0], &positions[0]
    return run(&b, values.shape[0], threads)
