"""Text measurements shared by the constraint family and the IFEval checkers.

Words are maximal runs of ``\\w`` characters (the IFEval convention: "don't" is
two words, "3.5" is two). Sentences end at ``.``, ``!`` or ``?`` followed by
whitespace or the end of the text, except after common abbreviations
(Mr., Dr., e.g., ...), single-letter initials and inside numbers; a line break
alone does not end a sentence. This is our own small splitter: IFEval uses
NLTK's punkt model, which can differ on unusual text (see docs/ifeval.md).
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"\w+")
_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "inc", "ltd", "co", "vs", "etc", "e.g", "i.e", "no",
    "capt", "lt", "mt", "fig", "approx", "dept", "est", "ph.d", "u.s", "a.m", "p.m",
}
_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def count_words(text: str) -> int:
    return len(WORD_RE.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (stripped, non-empty); a trailing fragment without
    end punctuation counts as a sentence."""
    out, start = [], 0
    for m in _END.finditer(text):
        before = text[start:m.start()]
        last = before.split()[-1].lower() if before.split() else ""
        last = last.lstrip("\"'(“‘")
        if m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
            if last in _ABBREV or (len(last) == 1 and last.isalpha()):
                continue  # "Dr. Smith", "J. R. R. Tolkien"
        piece = text[start:m.end()].strip()
        if WORD_RE.search(piece):
            out.append(piece)
        elif out and piece:
            out[-1] = out[-1] + piece  # stray punctuation such as "?!" after a quote
        start = m.end()
    tail = text[start:].strip()
    if WORD_RE.search(tail):
        out.append(tail)
    return out


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def paragraphs(text: str) -> list[str]:
    """Blocks separated by one or more blank lines (non-empty ones only)."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def strip_code_fence(text: str) -> str:
    """Remove one surrounding markdown code fence (```json ... ```), if present."""
    t = text.strip()
    m = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?```", t, flags=re.DOTALL)
    return m.group(1).strip() if m else t
