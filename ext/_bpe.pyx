# cython: language_level=3
# distutils: language = c++
"""Byte-level BPE core: the pre-tokenizer scanner and the rank-based merge loop, nogil.

Hand-written because this is the per-request CPU hot path: a regex engine
(what tiktoken and Hugging Face use for the split) costs more than the merges,
so the split rules of each model family are written out as a scanner over
UTF-8 bytes. Everything here works on raw bytes and token ids; the Python face
(tokenizer.py) owns loading, special tokens' meaning and text decoding.

The split rules, written as the regexes they replace:

  gpt2     's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
  smollm   every \\p{N} character on its own, then gpt2 on the text between them
  llama3   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}
           | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+
  qwen2    llama3 with \\p{N} instead of \\p{N}{1,3}

A regex tries its alternatives in order at each position and takes the first
that matches; each `*_piece_end` function below does the same, so a piece is
exactly the regex's next match.

Merges: a piece that is itself a token reachable by the merges (checked once
at load for every token) is emitted directly, as tiktoken does; otherwise the
lowest-ranked adjacent pair is merged until none is left (leftmost first on a
tie, as Hugging Face does). Short pieces use an O(n^2) scan over a small
array, which beats a heap for the usual handful of bytes; long pieces (runs of
spaces, base64 blobs) use a heap so they stay O(n log n).

Bytes with no token of their own (SmolLM2 lacks 21 of the 256) are dropped
before the merges, as Hugging Face `tokenizers` does for a vocabulary without
an unknown token, so their neighbours can merge across the gap.
"""

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cython.parallel cimport prange, parallel
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp
from libcpp.queue cimport priority_queue
from libcpp.string cimport string
from libcpp.vector cimport vector

import regex

# Split rules; tokenizer.py maps the GGUF `tokenizer.ggml.pre` names onto these.
cdef enum SplitRule:
    GPT2 = 0
    SMOLLM = 1
    LLAMA3 = 2
    QWEN2 = 3

SPLIT_GPT2, SPLIT_SMOLLM, SPLIT_LLAMA3, SPLIT_QWEN2 = GPT2, SMOLLM, LLAMA3, QWEN2

cdef enum CharClass:
    OTHER = 0
    LETTER = 1
    NUMBER = 2
    SPACE = 3

cdef int32_t NO_RANK = 0x7FFFFFFF
cdef uint64_t EMPTY_KEY = 0xFFFFFFFFFFFFFFFFULL
cdef enum:
    SHORT_PIECE = 48   # longest piece merged with the O(n^2) scan

# Unicode class of every code point: \p{L}, \p{N}, \s (White_Space) or other.
# The classes come from the `regex` package, whose Unicode database follows the
# newest standard (Python's unicodedata is frozen per Python release: 3.11 has
# Unicode 14, while Hugging Face's Oniguruma already knows Unicode 16 letters).
cdef uint8_t CHAR_CLASS[0x110000]

# White_Space, the set that Oniguruma's and Rust's \s match.
_WHITE_SPACE = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
                *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]


def _build_char_classes() -> None:
    """Fill CHAR_CLASS (once, at import)."""
    cdef Py_ssize_t cp, start, end
    # Planes 4-13 are unassigned and planes 15-16 are private use: all OTHER.
    planes = [(0, 0xD800), (0xE000, 0x40000), (0xE0000, 0xE1000)]
    for klass, pattern in ((LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+")):
        for first, last in planes:
            text = "".join(map(chr, range(first, last)))
            for match in regex.finditer(pattern, text):
                start, end = match.span()
                for cp in range(first + start, first + end):
                    CHAR_CLASS[cp] = klass
    for cp in _WHITE_SPACE:
        CHAR_CLASS[cp] = SPACE


_build_char_classes()


# ---------------------------------------------------------------- the scanner

cdef inline uint32_t decode_char(const uint8_t* s, Py_ssize_t i, int* width) noexcept nogil:
    """The code point starting at s[i] (valid UTF-8 is guaranteed by str.encode)."""
    cdef uint8_t b = s[i]
    if b < 0x80:
        width[0] = 1
        return b
    if b < 0xE0:
        width[0] = 2
        return ((b & 0x1F) << 6) | (s[i + 1] & 0x3F)
    if b < 0xF0:
        width[0] = 3
        return ((b & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F)
    width[0] = 4
    return (((b & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12)
            | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F))


cdef inline int class_at(const uint8_t* s, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    """Class of the character at s[i], or -1 at the end."""
    cdef int width
    if i >= end:
        return -1
    return CHAR_CLASS[decode_char(s, i, &width)]


cdef inline Py_ssize_t run_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                               int klass) noexcept nogil:
    """End of the run of characters of one class starting at i."""
    cdef int width
    while i < end and CHAR_CLASS[decode_char(s, i, &width)] == klass:
        i += width
    return i


cdef inline Py_ssize_t number_run_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                                      int most) noexcept nogil:
    """End of a run of at most `most` number characters starting at i."""
    cdef int width, count = 0
    while count < most and i < end and CHAR_CLASS[decode_char(s, i, &width)] == NUMBER:
        i += width
        count += 1
    return i


cdef inline bint letter_at(const uint8_t* s, Py_ssize_t i, Py_ssize_t end, uint8_t lower,
                           bint ignore_case) noexcept nogil:
    """s[i] is the ASCII letter `lower` (or its capital, when ignoring case)."""
    return i < end and ((s[i] | 0x20) if ignore_case else s[i]) == lower


cdef Py_ssize_t contraction_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                                bint ignore_case) noexcept nogil:
    """End of 's 't 're 've 'm 'll 'd after the apostrophe at i - 1, or 0 for none."""
    cdef uint8_t c
    if i >= end:
        return 0
    c = s[i]
    if ignore_case:
        # U+017F (long s) case-folds to 's', and (?i) regexes match it.
        if c == 0xC5 and i + 1 < end and s[i + 1] == 0xBF:
            return i + 2
        c = c | 0x20 if 0x41 <= c <= 0x5A else c
    if c == 0x73 or c == 0x74 or c == 0x6d or c == 0x64:   # 's 't 'm 'd
        return i + 1
    if (c == 0x72 or c == 0x76) and letter_at(s, i + 1, end, 0x65, ignore_case):   # 're 've
        return i + 2
    if c == 0x6c and letter_at(s, i + 1, end, 0x6c, ignore_case):   # 'll
        return i + 2
    return 0


cdef Py_ssize_t space_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                          bint numbers_split) noexcept nogil:
    """\\s+(?!\\S)|\\s+ : a whitespace run, less its last character when text follows.

    Under the smollm rule a number character is a piece boundary, so a run
    followed by one behaves as at the end of the text.
    """
    cdef int width
    cdef Py_ssize_t last = i
    cdef Py_ssize_t j = i
    cdef int klass
    while j < end:
        klass = CHAR_CLASS[decode_char(s, j, &width)]
        if klass != SPACE:
            if (numbers_split and klass == NUMBER) or last == i:
                return j
            return last
        last = j
        j += width
    return j


cdef Py_ssize_t gpt2_piece_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                               bint numbers_split) noexcept nogil:
    cdef int width, k1
    cdef uint32_t c0 = decode_char(s, i, &width)
    cdef int k0 = CHAR_CLASS[c0]
    cdef Py_ssize_t j
    if numbers_split and k0 == NUMBER:
        return i + width
    if c0 == 0x27:  # apostrophe
        j = contraction_end(s, i + 1, end, False)
        if j:
            return j
    if c0 == 0x20:
        k1 = class_at(s, i + 1, end)
        if k1 == LETTER or k1 == OTHER or (k1 == NUMBER and not numbers_split):
            return run_end(s, i + 1, end, k1)
    if k0 != SPACE:
        return run_end(s, i + width, end, k0)
    return space_end(s, i, end, numbers_split)


cdef inline Py_ssize_t newline_run_end(const uint8_t* s, Py_ssize_t i,
                                       Py_ssize_t end) noexcept nogil:
    while i < end and (s[i] == 0x0D or s[i] == 0x0A):
        i += 1
    return i


cdef Py_ssize_t llama3_piece_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                                 int most_numbers) noexcept nogil:
    cdef int width, w
    cdef uint32_t c0 = decode_char(s, i, &width)
    cdef int k0 = CHAR_CLASS[c0]
    cdef Py_ssize_t j, after_newline
    if c0 == 0x27:
        j = contraction_end(s, i + 1, end, True)
        if j:
            return j
    # [^\r\n\p{L}\p{N}]?\p{L}+
    if k0 == LETTER:
        return run_end(s, i + width, end, LETTER)
    if k0 != NUMBER and c0 != 0x0D and c0 != 0x0A and class_at(s, i + width, end) == LETTER:
        return run_end(s, i + width, end, LETTER)
    # \p{N}{1,3}
    if k0 == NUMBER:
        return number_run_end(s, i, end, most_numbers)
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    if k0 == OTHER:
        return newline_run_end(s, run_end(s, i + width, end, OTHER), end)
    if c0 == 0x20 and class_at(s, i + 1, end) == OTHER:
        return newline_run_end(s, run_end(s, i + 1, end, OTHER), end)
    # \s*[\r\n]+ : through the run's last newline, if it has one
    j = i
    after_newline = 0
    while j < end and CHAR_CLASS[decode_char(s, j, &w)] == SPACE:
        if s[j] == 0x0D or s[j] == 0x0A:
            after_newline = j + 1
        j += w
    if after_newline:
        return after_newline
    return space_end(s, i, end, False)


cdef inline Py_ssize_t piece_end(const uint8_t* s, Py_ssize_t i, Py_ssize_t end,
                                 int rule) noexcept nogil:
    """End of the pre-tokenizer piece that starts at i."""
    if rule == GPT2:
        return gpt2_piece_end(s, i, end, False)
    if rule == SMOLLM:
        return gpt2_piece_end(s, i, end, True)
    if rule == LLAMA3:
        return llama3_piece_end(s, i, end, 3)
    return llama3_piece_end(s, i, end, 1)


cdef inline const uint8_t* utf8_of(str text, Py_ssize_t* length) except NULL:
    """The UTF-8 bytes of text, cached in the str object (no copy for ASCII text).

    The scanner may rely on valid UTF-8 because it only ever sees text from here;
    a lone surrogate raises UnicodeEncodeError.
    """
    return <const uint8_t*>PyUnicode_AsUTF8AndSize(text, length)


def split(str text, int rule) -> list:
    """The pre-tokenizer pieces of `text` under `rule`, as UTF-8 (for tests and debugging)."""
    cdef Py_ssize_t n, i = 0, j
    cdef const uint8_t* s = utf8_of(text, &n)
    pieces = []
    while i < n:
        j = piece_end(s, i, n, rule)
        pieces.append(s[i:j])
        i = j
    return pieces


# ------------------------------------------------------------------- the BPE

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x = (x ^ (x >> 31)) * 0x7FB5D329728EA185ULL
    x = (x ^ (x >> 27)) * 0x81DADEF4BC2DD44DULL
    return x ^ (x >> 33)


cdef inline uint64_t hash_bytes(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """FNV-1a: short keys, no alignment needs."""
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ p[k]) * 0x100000001B3ULL
    return h


cdef size_t table_size(size_t count):
    """A power of two at least twice `count`, for open addressing."""
    cdef size_t size = 16
    while size < 2 * count:
        size *= 2
    return size


cdef class BytePairEncoder:
    """Token bytes, merges and special tokens, with nogil encode and decode."""

    cdef readonly int rule
    cdef readonly int32_t vocab_size
    cdef vector[int64_t] token_offsets      # token id -> [start, end) in token_data
    cdef string token_data
    cdef int32_t byte_ids[256]              # single byte -> token id, -1 when missing
    cdef vector[uint64_t] merge_keys        # (left id << 32 | right id), open addressing
    cdef vector[int32_t] merge_ranks
    cdef vector[int32_t] merge_results
    cdef uint64_t merge_mask
    cdef vector[int32_t] whole_tokens       # bytes -> id for tokens that merges reach
    cdef uint64_t whole_mask
    cdef vector[int32_t] specials           # longest first
    cdef bint special_first_byte[256]
    cdef vector[uint8_t] is_special         # matched in text before splitting
    cdef vector[uint8_t] is_skipped         # dropped by decode(skip_special=True)

    def __init__(self, list token_bytes, list merges, list special_ids, list skip_ids,
                 int rule, bint ignore_merges=False):
        """token_bytes[id] is the token's raw bytes; merges are (left id, right id,
        merged id) by rank; special_ids are matched in text before splitting;
        skip_ids are left out by decode(skip_special=True)."""
        if rule not in (GPT2, SMOLLM, LLAMA3, QWEN2):
            raise ValueError(f"unknown split rule {rule}")
        self.rule = rule
        self.vocab_size = len(token_bytes)
        self._store_tokens(token_bytes)
        self._store_merges(merges)
        self._store_specials(special_ids)
        for t in skip_ids:
            self.is_skipped[t] = 1
        self._store_whole_tokens(ignore_merges)

    def _store_tokens(self, list token_bytes):
        cdef int32_t i
        cdef bytes b
        self.token_offsets.push_back(0)
        for i in range(256):
            self.byte_ids[i] = -1
        for i in range(self.vocab_size):
            b = token_bytes[i]
            self.token_data.append(<string>b)
            self.token_offsets.push_back(self.token_data.size())
            if len(b) == 1 and self.byte_ids[b[0]] < 0:
                self.byte_ids[b[0]] = i
        self.is_special.assign(self.vocab_size, 0)
        self.is_skipped.assign(self.vocab_size, 0)

    def _store_merges(self, list merges):
        cdef size_t size = table_size(len(merges))
        cdef uint64_t key, slot
        cdef int32_t rank = 0, left, right, merged
        self.merge_mask = size - 1
        self.merge_keys.assign(size, EMPTY_KEY)
        self.merge_ranks.assign(size, NO_RANK)
        self.merge_results.assign(size, -1)
        for left, right, merged in merges:
            key = (<uint64_t>left << 32) | <uint32_t>right
            slot = mix64(key) & self.merge_mask
            while self.merge_keys[slot] != EMPTY_KEY and self.merge_keys[slot] != key:
                slot = (slot + 1) & self.merge_mask
            if self.merge_keys[slot] == EMPTY_KEY:   # a repeated pair keeps its first rank
                self.merge_keys[slot] = key
                self.merge_ranks[slot] = rank
                self.merge_results[slot] = merged
            rank += 1

    def _store_specials(self, list special_ids):
        cdef int32_t sid
        cdef int i
        for i in range(256):
            self.special_first_byte[i] = False
        ordered = sorted(set(special_ids), key=lambda t: -self._length(t))
        for sid in ordered:
            if self._length(sid) == 0:
                continue
            self.specials.push_back(sid)
            self.is_special[sid] = 1
            self.special_first_byte[<uint8_t>self.token_data[self.token_offsets[sid]]] = True

    def _store_whole_tokens(self, bint ignore_merges):
        """Index every token that the merges produce from its own bytes."""
        cdef int32_t t
        cdef vector[int32_t] out
        cdef size_t size = table_size(self.vocab_size)
        self.whole_mask = size - 1
        self.whole_tokens.assign(size, -1)
        for t in range(self.vocab_size):
            if self.is_special[t] or self._length(t) < 2:
                continue
            if not ignore_merges:
                out.clear()
                self.merge_piece(self._token_ptr(t), self._length(t), &out)
                if out.size() != 1 or out[0] != t:
                    continue
            self._insert_whole(t)

    cdef void _insert_whole(self, int32_t t) noexcept:
        cdef uint64_t slot = hash_bytes(self._token_ptr(t), self._length(t)) & self.whole_mask
        while self.whole_tokens[slot] >= 0:
            if self._same_bytes(self.whole_tokens[slot], self._token_ptr(t), self._length(t)):
                return   # duplicate bytes: the first id wins
            slot = (slot + 1) & self.whole_mask
        self.whole_tokens[slot] = t

    cdef inline const uint8_t* _token_ptr(self, int32_t t) noexcept nogil:
        return <const uint8_t*>self.token_data.data() + self.token_offsets[t]

    cdef inline Py_ssize_t _length(self, int32_t t) noexcept nogil:
        return self.token_offsets[t + 1] - self.token_offsets[t]

    cdef inline bint _same_bytes(self, int32_t t, const uint8_t* p, Py_ssize_t n) noexcept nogil:
        return self._length(t) == n and memcmp(self._token_ptr(t), p, n) == 0

    cdef inline int32_t whole_token(self, const uint8_t* p, Py_ssize_t n) noexcept nogil:
        cdef uint64_t slot = hash_bytes(p, n) & self.whole_mask
        cdef int32_t t = self.whole_tokens[slot]
        while t >= 0:
            if self._same_bytes(t, p, n):
                return t
            slot = (slot + 1) & self.whole_mask
            t = self.whole_tokens[slot]
        return -1

    cdef inline int32_t merge_rank(self, int32_t left, int32_t right,
                                   int32_t* merged) noexcept nogil:
        cdef uint64_t key = (<uint64_t>left << 32) | <uint32_t>right
        cdef uint64_t slot = mix64(key) & self.merge_mask
        cdef uint64_t found
        while True:
            found = self.merge_keys[slot]
            if found == key:
                merged[0] = self.merge_results[slot]
                return self.merge_ranks[slot]
            if found == EMPTY_KEY:
                return NO_RANK
            slot = (slot + 1) & self.merge_mask

    # -- merging one piece

    cdef void merge_piece(self, const uint8_t* p, Py_ssize_t n,
                          vector[int32_t]* out) noexcept nogil:
        """Append the BPE of the bytes p[0:n] to out."""
        cdef vector[int32_t] ids
        cdef Py_ssize_t k
        cdef int32_t t
        ids.reserve(n)
        for k in range(n):
            t = self.byte_ids[p[k]]
            if t >= 0:   # a byte with no token is dropped (see the module docstring)
                ids.push_back(t)
        if <Py_ssize_t>ids.size() <= SHORT_PIECE:
            self.merge_short(ids)
        else:
            self.merge_long(ids)
        out.insert(out.end(), ids.begin(), ids.end())

    cdef void merge_short(self, vector[int32_t]& ids) noexcept nogil:
        """Repeatedly merge the leftmost lowest-ranked pair: O(n^2), cache-friendly."""
        cdef Py_ssize_t n = ids.size(), k, best
        cdef int32_t ranks[SHORT_PIECE]
        cdef int32_t results[SHORT_PIECE]
        cdef int32_t best_rank
        for k in range(n - 1):
            ranks[k] = self.merge_rank(ids[k], ids[k + 1], &results[k])
        while n > 1:
            best = 0
            best_rank = ranks[0]
            for k in range(1, n - 1):
                if ranks[k] < best_rank:
                    best_rank = ranks[k]
                    best = k
            if best_rank == NO_RANK:
                break
            ids[best] = results[best]
            for k in range(best + 1, n - 1):
                ids[k] = ids[k + 1]
                if k + 1 < n - 1:
                    ranks[k] = ranks[k + 1]
                    results[k] = results[k + 1]
            n -= 1
            if best > 0:
                ranks[best - 1] = self.merge_rank(ids[best - 1], ids[best], &results[best - 1])
            if best < n - 1:
                ranks[best] = self.merge_rank(ids[best], ids[best + 1], &results[best])
        ids.resize(n)

    cdef void merge_long(self, vector[int32_t]& ids) noexcept nogil:
        """The same merges with a heap of (rank, position) and a linked list: O(n log n)."""
        cdef Py_ssize_t n = ids.size(), k, nxt
        cdef vector[Py_ssize_t] prev, next_
        cdef vector[uint8_t] alive
        cdef priority_queue[uint64_t] heap   # holds ~(rank << 32 | position): a min-heap
        cdef uint64_t entry
        cdef int32_t rank, merged
        prev.resize(n)
        next_.resize(n)
        alive.assign(n, 1)
        for k in range(n):
            prev[k] = k - 1
            next_[k] = k + 1 if k + 1 < n else -1
            if k + 1 < n:
                rank = self.merge_rank(ids[k], ids[k + 1], &merged)
                if rank != NO_RANK:
                    heap.push(~((<uint64_t>rank << 32) | <uint64_t>k))
        while not heap.empty():
            entry = ~heap.top()
            heap.pop()
            k = <Py_ssize_t>(entry & 0xFFFFFFFFULL)
            nxt = next_[k]
            if not alive[k] or nxt < 0:
                continue
            # A stale entry: the pair at k changed since it was pushed (ranks are unique).
            if self.merge_rank(ids[k], ids[nxt], &merged) != <int32_t>(entry >> 32):
                continue
            ids[k] = merged
            alive[nxt] = 0
            next_[k] = next_[nxt]
            if next_[k] >= 0:
                prev[next_[k]] = k
                rank = self.merge_rank(ids[k], ids[next_[k]], &merged)
                if rank != NO_RANK:
                    heap.push(~((<uint64_t>rank << 32) | <uint64_t>k))
            if prev[k] >= 0:
                rank = self.merge_rank(ids[prev[k]], ids[k], &merged)
                if rank != NO_RANK:
                    heap.push(~((<uint64_t>rank << 32) | <uint64_t>prev[k]))
        nxt = 0
        for k in range(n):
            if alive[k]:
                ids[nxt] = ids[k]
                nxt += 1
        ids.resize(nxt)

    # -- encoding text

    cdef void encode_ordinary(self, const uint8_t* s, Py_ssize_t start, Py_ssize_t end,
                              vector[int32_t]* out) noexcept nogil:
        cdef Py_ssize_t i = start, j
        cdef int32_t t
        while i < end:
            j = piece_end(s, i, end, self.rule)
            if j - i == 1:
                t = self.byte_ids[s[i]]
            else:
                t = self.whole_token(s + i, j - i)
            if t >= 0:
                out.push_back(t)
            elif j - i > 1:
                self.merge_piece(s + i, j - i, out)
            i = j

    cdef inline int32_t special_at(self, const uint8_t* s, Py_ssize_t i,
                                   Py_ssize_t end) noexcept nogil:
        """The longest special token starting at s[i], or -1."""
        cdef int32_t t
        for t in self.specials:
            if self._length(t) <= end - i and memcmp(self._token_ptr(t), s + i, self._length(t)) == 0:
                return t
        return -1

    cdef void encode_into(self, const uint8_t* s, Py_ssize_t n, bint parse_special,
                          vector[int32_t]* out) noexcept nogil:
        """Special tokens first (leftmost-longest), then the pieces between them."""
        cdef Py_ssize_t i = 0, start = 0
        cdef int32_t t
        if parse_special and not self.specials.empty():
            while i < n:
                if self.special_first_byte[s[i]]:
                    t = self.special_at(s, i, n)
                    if t >= 0:
                        self.encode_ordinary(s, start, i, out)
                        out.push_back(t)
                        i += self._length(t)
                        start = i
                        continue
                i += 1
        self.encode_ordinary(s, start, n, out)

    def encode(self, str text, bint parse_special=True) -> list:
        """Token ids of text."""
        cdef vector[int32_t] out
        cdef Py_ssize_t n
        cdef const uint8_t* s = utf8_of(text, &n)
        with nogil:
            out.reserve(n // 3 + 8)
            self.encode_into(s, n, parse_special, &out)
        return out

    def encode_batch(self, list texts, bint parse_special=True, int num_threads=1) -> list:
        """Token ids of each text, encoded in parallel without the GIL."""
        cdef Py_ssize_t count = len(texts), k, n
        cdef vector[const uint8_t*] starts
        cdef vector[Py_ssize_t] lengths
        cdef vector[vector[int32_t]] outs
        cdef str text
        cdef int threads = max(num_threads, 1)
        for text in texts:
            starts.push_back(utf8_of(text, &n))
            lengths.push_back(n)
        outs.resize(count)
        with nogil, parallel(num_threads=threads):
            for k in prange(count, schedule='dynamic'):
                self.encode_into(starts[k], lengths[k], parse_special, &outs[k])
        return [out for out in outs]

    # -- decoding

    def decode(self, ids, bint skip_special=False) -> bytes:
        """The bytes of token ids; an id outside the vocabulary raises ValueError."""
        cdef string out
        cdef int64_t t
        for value in ids:
            t = value
            if t < 0 or t >= self.vocab_size:
                raise ValueError(f"token id {value} is not in the vocabulary (0..{self.vocab_size - 1})")
            if skip_special and self.is_skipped[t]:
                continue
            out.append(<const char*>self._token_ptr(<int32_t>t), self._length(<int32_t>t))
        return out

    def token_bytes(self, int32_t t) -> bytes:
        if t < 0 or t >= self.vocab_size:
            raise ValueError(f"token id {t} is not in the vocabulary (0..{self.vocab_size - 1})")
        return self.token_data.substr(self.token_offsets[t], self._length(t))

    def bytes_without_token(self) -> list:
        """The byte values that no single token stands for (dropped when met)."""
        return [b for b in range(256) if self.byte_ids[b] < 0]

