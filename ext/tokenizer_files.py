"""Tokenizer files: the TokenizerSpec they describe, read from a GGUF model file or a Hugging Face folder.

Everything that knows a file format lives here (GGUF's pre-tokenizer names and
token types, the split regexes of tokenizer.json); `tokenizer.py` builds the
encoder from the spec and parses no file format.

Every failure is a TokenizerLoadError (or FileNotFoundError) that names the
file and says what is wrong with it.

`gguf.GGUFReader` parses a 49k-token vocabulary in seconds (one numpy view per
string), so a spec read from a GGUF file is cached as JSON under
$RINGLM_CACHE_DIR (default ~/.cache/ringlm), keyed by the file's path, size and
modification time; a later load of the same file takes a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ringlm.ext import _bpe

# GGUF `tokenizer.ggml.pre` values (as llama.cpp names them) -> split rules.
SPLIT_RULES = {
    "gpt2": _bpe.SPLIT_GPT2,
    "gpt-2": _bpe.SPLIT_GPT2,
    "smollm": _bpe.SPLIT_SMOLLM,
    "llama-bpe": _bpe.SPLIT_LLAMA3,
    "llama3": _bpe.SPLIT_LLAMA3,
    "llama-v3": _bpe.SPLIT_LLAMA3,
    "qwen2": _bpe.SPLIT_QWEN2,
}

# The split regexes of Hugging Face tokenizer.json files, for from_pretrained.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PATTERN_RULES = {LLAMA3_PATTERN: _bpe.SPLIT_LLAMA3, QWEN2_PATTERN: _bpe.SPLIT_QWEN2,
                 GPT2_PATTERN: _bpe.SPLIT_GPT2}

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


class TokenizerLoadError(ValueError):
    """A tokenizer file that is missing, corrupt or of a kind ringlm does not support."""


@dataclass
class TokenizerSpec:
    """Everything a Tokenizer is built from, whatever the file format."""

    tokens: list[str]                  # vocabulary entries in byte-level form, by id
    merges: list[tuple[str, str]]      # by rank
    split_rule: int
    special_ids: list[int] = field(default_factory=list)   # matched in text, skipped in decode
    added_ids: list[int] = field(default_factory=list)     # matched in text, kept in decode
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    ignore_merges: bool = False
    normalize_nfc: bool = False
    source: str = "<memory>"


# ---------------------------------------------------------------- GGUF

CACHE_FORMAT = 1


def cache_path(path: Path) -> Path:
    stat = path.stat()
    identity = f"{CACHE_FORMAT}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    folder = Path(os.environ.get("RINGLM_CACHE_DIR") or Path.home() / ".cache" / "ringlm")
    return folder / "tokenizers" / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".json")


def read_gguf_spec(path: Path) -> TokenizerSpec:
    """The tokenizer stored in a GGUF file's metadata, from the cache when it is there."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    cached = cache_path(path)
    try:
        data = json.loads(cached.read_text(encoding="utf-8"))
        data["merges"] = [tuple(merge) for merge in data["merges"]]   # JSON has no tuples
        return TokenizerSpec(**data)
    except (OSError, ValueError, TypeError, KeyError):
        pass   # no cache yet, or one from another version: read the file
    spec = read_gguf_metadata(path)
    write_atomically(cached, json.dumps(dataclasses.asdict(spec), ensure_ascii=False))
    return spec


def write_atomically(path: Path, text: str) -> None:
    """Write text to path via a temporary file; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError:
        pass


def read_gguf_metadata(path: Path) -> TokenizerSpec:
    """The tokenizer stored in a GGUF file's metadata (as llama.cpp reads it)."""
    fields = read_gguf_fields(path)

    def get(key, default=None, required=False):
        field = fields.get(key)
        if field is None:
            if required:
                raise TokenizerLoadError(f"{path}: GGUF metadata has no '{key}'")
            return default
        return field.contents()

    model = get("tokenizer.ggml.model", required=True)
    if model != "gpt2":
        raise TokenizerLoadError(
            f"{path}: tokenizer model '{model}' is not supported; ringlm reads byte-level "
            "BPE tokenizers (tokenizer.ggml.model = 'gpt2')")
    pre = get("tokenizer.ggml.pre", "gpt2")
    if pre not in SPLIT_RULES:
        raise TokenizerLoadError(
            f"{path}: pre-tokenizer '{pre}' is not supported; supported: {', '.join(sorted(SPLIT_RULES))}")
    tokens = list(get("tokenizer.ggml.tokens", required=True))
    types = list(get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [split_merge(m, path) for m in get("tokenizer.ggml.merges", required=True)]
    if len(types) != len(tokens):
        raise TokenizerLoadError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    return TokenizerSpec(
        tokens=tokens,
        merges=merges,
        split_rule=SPLIT_RULES[pre],
        special_ids=[i for i, kind in enumerate(types) if kind == TOKEN_CONTROL],
        added_ids=[i for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED],
        bos_id=checked_id(get("tokenizer.ggml.bos_token_id"), tokens, path, "bos"),
        eos_id=checked_id(get("tokenizer.ggml.eos_token_id"), tokens, path, "eos"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        chat_template=get("tokenizer.chat_template"),
        # llama.cpp takes a whole-word vocabulary hit before merging for Llama 3.
        ignore_merges=SPLIT_RULES[pre] == _bpe.SPLIT_LLAMA3,
        source=str(path),
    )


def read_gguf_fields(path: Path) -> dict:
    """The metadata fields of a GGUF file, with errors that name the file."""
    import gguf

    try:
        return dict(gguf.GGUFReader(str(path), "r").fields)
    except Exception as error:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise TokenizerLoadError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None


def split_merge(merge: str, path: Path) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise TokenizerLoadError(f"{path}: malformed merge {merge!r} (expected 'left right')")
    return left, right


def checked_id(value, tokens: list, path: Path, name: str) -> int | None:
    if value is None:
        return None
    if not 0 <= int(value) < len(tokens):
        raise TokenizerLoadError(f"{path}: {name} token id {value} is outside the vocabulary")
    return int(value)


# ---------------------------------------------------------------- Hugging Face

def read_hf_spec(folder: Path) -> TokenizerSpec:
    """The tokenizer of a Hugging Face folder: tokenizer.json (+ tokenizer_config.json)."""
    path = folder / "tokenizer.json"
    data = read_json(path)
    config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerLoadError(f"{path}: model type {model.get('type')!r} is not supported; "
                                 "ringlm reads byte-level BPE tokenizers")
    tokens = vocab_list(model["vocab"], data.get("added_tokens", []), path)
    special_ids, added_ids = [], []
    for added in data.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise TokenizerLoadError(f"{path}: added token {added['content']!r} uses "
                                     "lstrip/rstrip/single_word, which ringlm does not support")
        (special_ids if added.get("special") else added_ids).append(added["id"])
    ids = {token: i for i, token in enumerate(tokens)}
    bos, eos = config_token(config, "bos_token"), config_token(config, "eos_token")
    return TokenizerSpec(
        tokens=tokens,
        merges=[hf_merge(m, path) for m in model.get("merges", [])],
        split_rule=hf_split_rule(data.get("pre_tokenizer"), path),
        special_ids=special_ids,
        added_ids=added_ids,
        bos_id=ids.get(bos) if bos else None,
        eos_id=ids.get(eos) if eos else None,
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
        ignore_merges=bool(model.get("ignore_merges", False)),
        normalize_nfc=hf_normalizer(data.get("normalizer"), path),
        source=str(path),
    )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise TokenizerLoadError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object at the top level")
    return data


def vocab_list(vocab: dict, added_tokens: list, path: Path) -> list[str]:
    """Vocabulary entries indexed by id, added tokens included."""
    by_id = {int(i): token for token, i in vocab.items()}
    for added in added_tokens:
        by_id.setdefault(int(added["id"]), added["content"])
    size = max(by_id) + 1 if by_id else 0
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise TokenizerLoadError(f"{path}: the vocabulary has no entry for id {missing[0]}")
    return [by_id[i] for i in range(size)]


def hf_merge(merge, path: Path) -> tuple[str, str]:
    if isinstance(merge, list) and len(merge) == 2:
        return merge[0], merge[1]
    if isinstance(merge, str):
        return split_merge(merge, path)
    raise TokenizerLoadError(f"{path}: malformed merge {merge!r}")


def hf_split_rule(pre: dict | None, path: Path) -> int:
    """Recognise the supported pre-tokenizers by their structure."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") if p else None for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return _bpe.SPLIT_GPT2
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)):
        return _bpe.SPLIT_SMOLLM
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in PATTERN_RULES and parts[0].get("behavior") == "Isolated":
            return PATTERN_RULES[pattern]
    raise TokenizerLoadError(f"{path}: this pre-tokenizer is not supported: {json.dumps(pre)[:300]}")


def hf_normalizer(normalizer: dict | None, path: Path) -> bool:
    """True for NFC, False for none; anything else is unsupported."""
    if normalizer is None:
        return False
    if normalizer.get("type") == "NFC":
        return True
    raise TokenizerLoadError(f"{path}: normalizer {normalizer.get('type')!r} is not supported")


def config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):   # older files store {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
