"""Tokenizer: byte-level BPE models (GPT-2, SmolLM2, Llama 3, Qwen2) over the Cython core.

Loads the vocabulary, merges, special tokens and chat template from a GGUF file
or a Hugging Face `tokenizer.json` folder, and gives exactly the ids Hugging
Face `tokenizers` gives with the model's original pre-tokenizer. The hot loops
(splitting and merging) live in `_bpe.pyx`; this module is the policy around
them: which split rule, which special tokens, text <-> UTF-8, chat templates.
Reading the files into a `TokenizerSpec` is `tokenizer_files.py`'s job.
"""

from __future__ import annotations

import codecs
import json
import os
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import jinja2
import jinja2.sandbox

from ringlm.ext import _bpe, usable_cores
from ringlm.ext.model_files import resolve_model_path
from ringlm.ext.tokenizer_files import TokenizerLoadError, TokenizerSpec, read_gguf_spec, read_hf_spec


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level vocabularies are written in.

    Printable Latin-1 bytes stand for themselves; the rest (control bytes, space,
    0x7F-0xA0, 0xAD) are shifted to U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def token_string_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level vocabulary entry (characters outside the map are UTF-8)."""
    out = bytearray()
    for c in token:
        b = UNICODE_TO_BYTE.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def check_text(text: str) -> None:
    """A TypeError for non-text, a ValueError that says where a lone surrogate is."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = ord(text[error.start])
        raise ValueError(f"text has a lone surrogate U+{bad:04X} at index {error.start}: "
                         "it is not valid Unicode and cannot be tokenized") from None


class Tokenizer:
    """Byte-level BPE tokenizer.

    >>> tok = Tokenizer.from_gguf(default_model_path())
    >>> tok.decode(tok.encode("Hello world"))
    'Hello world'
    """

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._token_ids = {token: i for i, token in enumerate(spec.tokens)}
        added = set(spec.special_ids) | set(spec.added_ids)
        token_bytes = [spec.tokens[i].encode("utf-8") if i in added
                       else token_string_to_bytes(spec.tokens[i])
                       for i in range(len(spec.tokens))]
        self._core = _bpe.BytePairEncoder(
            token_bytes, self._merge_ids(spec), sorted(added), list(spec.special_ids),
            spec.split_rule, spec.ignore_merges)
        self._template = None
        # The texts `encode(parse_special=True)` turns into single ids (control and added tokens).
        self._matched_texts = sorted({spec.tokens[i] for i in added if spec.tokens[i]}, key=len, reverse=True)

    def _merge_ids(self, spec: TokenizerSpec) -> list[tuple[int, int, int]]:
        ids = self._token_ids
        merges = []
        for rank, (left, right) in enumerate(spec.merges):
            try:
                merges.append((ids[left], ids[right], ids[left + right]))
            except KeyError as missing:
                raise TokenizerLoadError(
                    f"{spec.source}: merge #{rank} '{left} {right}' uses {missing} "
                    "which is not in the vocabulary") from None
        return merges

    # -- loading

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a GGUF model file's `tokenizer.*` metadata."""
        return cls(read_gguf_spec(Path(path)))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load from a Hugging Face folder (tokenizer.json, optional tokenizer_config.json)."""
        return cls(read_hf_spec(Path(folder)))

    @classmethod
    def from_model(cls, name: str | os.PathLike = "default") -> Tokenizer:
        """Load the tokenizer of a `--model` value: "default", a .gguf file or a HF folder."""
        path = resolve_model_path(name)
        return cls.from_pretrained(path) if path.is_dir() else cls.from_gguf(path)

    # -- the vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.spec.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.spec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.spec.eos_id

    @property
    def special_ids(self) -> list[int]:
        return list(self.spec.special_ids)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry as the vocabulary spells it (e.g. 'Ġthe'), or None."""
        return self._token_ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is not in the vocabulary (0..{self.vocab_size - 1})")
        return self.spec.tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (special tokens: their text)."""
        return self._core.token_bytes(token_id)

    # -- encoding and decoding

    def _prepare(self, text: str) -> str:
        if not isinstance(text, str):
            check_text(text)
        return unicodedata.normalize("NFC", text) if self.spec.normalize_nfc else text

    def _encode_checked(self, encode, texts):
        """Run a core encode; turn its UnicodeEncodeError into a clear ValueError."""
        try:
            return encode()
        except UnicodeEncodeError:
            for text in texts:
                check_text(text)
            raise

    def _with_specials(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.spec.add_bos and self.spec.bos_id is not None:
                ids.insert(0, self.spec.bos_id)
            if self.spec.add_eos and self.spec.eos_id is not None:
                ids.append(self.spec.eos_id)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False,
               parse_special: bool = True) -> list[int]:
        """Token ids of text.

        Special tokens written in the text (e.g. '<|im_end|>') become their ids,
        as in Hugging Face; pass parse_special=False to tokenize them as plain
        text (for untrusted input). add_special_tokens adds the model's BOS/EOS
        where its metadata asks for them.
        """
        text = self._prepare(text)
        ids = self._encode_checked(lambda: self._core.encode(text, parse_special), (text,))
        return self._with_specials(ids, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False,
                     parse_special: bool = True, num_threads: int = 0) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel threads without the GIL.

        num_threads=0 uses every core this process may run on.
        """
        if num_threads <= 0:
            num_threads = usable_cores()
        texts = [self._prepare(text) for text in texts]
        batch = self._encode_checked(
            lambda: self._core.encode_batch(texts, parse_special, num_threads), texts)
        return [self._with_specials(ids, add_special_tokens) for ids in batch]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self._core.decode(ids, skip_special_tokens).decode("utf-8", "replace")

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # -- chat

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **variables) -> str:
        """Render chat messages with the model's own Jinja template, as Hugging Face does."""
        if not self.spec.chat_template:
            raise ValueError(f"{self.spec.source}: this model has no chat template")
        check_messages(messages)
        if self._template is None:
            self._template = compile_chat_template(self.spec.chat_template)
        special = {}
        if self.spec.bos_id is not None:
            special["bos_token"] = self.spec.tokens[self.spec.bos_id]
        if self.spec.eos_id is not None:
            special["eos_token"] = self.spec.tokens[self.spec.eos_id]
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt,
                                     **special, **variables)


    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages rendered with the model's template, in which only the template
        writes control tokens: text like '<|im_start|>' inside a message's content is tokenized as
        plain text, so a user cannot forge a turn or a system prompt.

        Contents without such text (nearly all) give exactly `encode(apply_chat_template(...))`.
        Otherwise the rendering is split where each content sits: the template's pieces are
        encoded with special tokens, the contents as plain text. A template that rewrites a
        content it contains (so the content cannot be found in the rendering) is refused then."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        if not any(self._has_matched_text(message["content"]) for message in messages):
            return self.encode(text)
        ids = []
        for piece, is_content in self._rendered_pieces(messages, add_generation_prompt, text):
            ids += self.encode(piece, parse_special=not is_content)
        return ids

    def _has_matched_text(self, content: str) -> bool:
        return any(token in content for token in self._matched_texts)

    def _rendered_pieces(self, messages: Sequence[dict], add_generation_prompt: bool,
                         text: str) -> list[tuple[str, bool]]:
        """The rendering as (piece, is a message's content) in order, found by rendering once more
        with each content replaced by a marker that no template changes."""
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = self.apply_chat_template([{**m, "content": marker} for m, marker in zip(messages, markers)],
                                          add_generation_prompt)
        pieces, position = [], 0
        for marker, message in zip(markers, messages):
            found = marked.find(marker, position)
            if found < 0 or marked.find(marker, found + 1) >= 0:
                raise ValueError("the chat template rewrites or repeats message contents, so control-token "
                                 "text in them cannot be kept plain; remove it from the messages")
            pieces += [(marked[position:found], False), (message["content"], True)]
            position = found + len(marker)
        pieces.append((marked[position:], False))
        if "".join(piece for piece, _ in pieces) != text:
            raise ValueError("the chat template renders message contents conditionally; control-token "
                             "text in them cannot be kept plain; remove it from the messages")
        return [(piece, is_content) for piece, is_content in pieces if piece]


class IncrementalDecoder:
    """Turns token ids, fed one at a time, into text, never emitting half a character.

    A character whose UTF-8 bytes are split across tokens is held back until
    its last byte arrives; bytes that can never form a character come out as
    U+FFFD, exactly as `Tokenizer.decode` gives for the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        """The complete text that token_id finishes (may be '')."""
        return self._utf8.decode(self._tokenizer._core.decode((token_id,), self._skip))

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD (the stream ended inside a character)."""
        return self._utf8.decode(b"", final=True)


def check_messages(messages: Sequence[dict]) -> None:
    """A clear error for chat messages that are not [{'role': str, 'content': str}, ...]."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict, not {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"message {i} needs a string '{key}'")


def compile_chat_template(source: str) -> jinja2.Template:
    """A sandboxed Jinja environment set up as Hugging Face's chat templates expect."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                  indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise TokenizerLoadError(f"the chat template does not parse: {error}") from None
