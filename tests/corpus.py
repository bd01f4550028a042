"""A text corpus built from files already on the machine, for tokenizer parity tests and benchmarks.

Three subsets, each a list of documents (one file each, in a fixed order so a
run is repeatable): Python sources (code), English prose (licenses and man
pages) and non-ASCII text (CJK test files, translated man pages, and
hand-written lines with accents, emoji and combining marks).
"""

from __future__ import annotations

import gzip
import sysconfig
from functools import lru_cache
from pathlib import Path

MAX_DOCUMENT = 200_000   # characters; longer files are cut so one file cannot dominate

HANDMADE_UNICODE = [
    "Ça va? Où est l'hôtel? Él habló con Zoë über Größe, naïve café, smörgåsbord.",
    "Ελληνικά: Η γρήγορη καφέ αλεπού. Русский: Съешь же ещё этих мягких французских булок.",
    "日本語のテキスト、中文文本，한국어 텍스트。 全角：ＡＢＣ１２３",
    "Emoji: 🙂😀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🧑🏿‍🚀 and keycaps 1️⃣ #️⃣",
    "Combining: e\u0301 a\u0300 o\u0308 n\u0303 Z\u0335\u0321a\u0336l\u0337g\u0338o\u0334 \u0915\u094d\u0937",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ ½ · π ≈ 3.14159; ① ② ③ Ⅻ ⅞ ٣٤٥ ߁߂",
    "RTL: שלום עולם مرحبا بالعالم — mixed עם English 123.",
    "Spaces: a\u00a0b\u2003c\u3000d\u200be\u2028f\u2029g\u0085h\u1680i",
    "Devanagari: नमस्ते दुनिया। Thai: สวัสดีชาวโลก Tamil: வணக்கம் உலகம்",
]


def python_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))


def english_files() -> list[Path]:
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    man_pages = sorted(Path("/usr/share/man/man1").glob("*.gz")) + sorted(Path("/usr/share/man/man8").glob("*.gz"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return licenses + [stdlib / "LICENSE.txt"] + man_pages


def unicode_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cjk = sorted((stdlib / "test" / "cjkencodings").glob("*-utf8.txt"))
    translated = []
    languages = sorted(p for p in Path("/usr/share/man").glob("*") if not p.name.startswith("man"))
    for rank in range(40):   # round-robin over languages so each contributes
        for language in languages:
            pages = sorted((language / "man1").glob("*.gz"))
            if rank < len(pages):
                translated.append(pages[rank])
    return cjk + translated


def read_text(path: Path) -> str | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")[:MAX_DOCUMENT]
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def collect(paths: list[Path], budget: int) -> list[str]:
    """Documents from paths, in order, until `budget` bytes of UTF-8 are gathered."""
    documents, size = [], 0
    for path in paths:
        text = read_text(path)
        if text:
            documents.append(text)
            size += len(text.encode("utf-8"))
            if size >= budget:
                break
    return documents


@lru_cache(maxsize=None)
def corpus(code_bytes: int = 2_500_000, english_bytes: int = 2_000_000,
           unicode_bytes: int = 700_000) -> dict[str, list[str]]:
    """{'code': [...], 'english': [...], 'unicode': [...]}; about 5.2 MB by default."""
    unicode_docs = collect(unicode_files(), unicode_bytes)
    return {
        "code": collect(python_sources(), code_bytes),
        "english": collect(english_files(), english_bytes),
        "unicode": unicode_docs + ["\n".join(HANDMADE_UNICODE * 20)],
    }


def size_in_bytes(documents: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in documents)
