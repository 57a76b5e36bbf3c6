"""Explicit, checkable constraints: checkers, the gold scorer and the repair rules.

A constraint is a JSON-able dict ``{"type": ..., **params}`` (docs/simulated-labelers.md
lists them all). This is the "follows explicit constraints" axis of InstructGPT
(Ouyang et al. 2022, Fig. 4 / Table 3 metadata): every constraint can be checked
by a program, so a *gold* score exists and simulated labelers can be built on it.

* :func:`check` / :func:`satisfied` / :func:`satisfies_all` - per-constraint verdicts.
* :func:`gold_score` - fraction satisfied plus a small quality term (below).
* :func:`repair` - edit any text (model output or template) until it satisfies
  every constraint; used to write demonstrations.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Sequence

from instructrl.tasks.text import count_sentences, count_words, paragraphs, split_sentences, strip_code_fence, words

Constraint = dict[str, Any]

# ---------------------------------------------------------------------------
# Checkers: one per type, (constraint, response) -> bool
# ---------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)


def _has_word(text: str, w: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def _json_obj(text: str):
    try:
        obj = json.loads(strip_code_fence(text))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _check_json(c: Constraint, r: str) -> bool:
    obj = _json_obj(r)
    if obj is None:
        return False
    return all(isinstance(obj.get(k), str) and obj[k].strip() for k in c["keys"])


def _check_numbered(c: Constraint, r: str) -> bool:
    nums = [int(m.group(1)) for m in _NUMBERED.finditer(r)]
    return nums == list(range(1, c["n"] + 1))


def _first_word(r: str) -> str:
    w = words(r)
    return w[0].lower() if w else ""


def _unquote(r: str) -> str:
    return r.strip().strip('"').strip()


CHECKS: dict[str, Callable[[Constraint, str], bool]] = {
    "max_words": lambda c, r: count_words(r) <= c["n"],
    "min_words": lambda c, r: count_words(r) >= c["n"],
    "max_sentences": lambda c, r: count_sentences(r) <= c["n"],
    "include_words": lambda c, r: all(_has_word(r, w) for w in c["words"]),
    "forbid_words": lambda c, r: not any(_has_word(r, w) for w in c["words"]),
    "lowercase": lambda c, r: r == r.lower() and any(ch.isalpha() for ch in r),
    "uppercase": lambda c, r: r == r.upper() and any(ch.isalpha() for ch in r),
    "bullets": lambda c, r: len(_BULLET.findall(r)) == c["n"] and not _NUMBERED.search(r),
    "numbered": _check_numbered,
    "json": _check_json,
    "end_with": lambda c, r: _unquote(r).lower().endswith(c["phrase"].lower()),
    "paragraphs": lambda c, r: len(paragraphs(r)) == c["n"],
    "start_with": lambda c, r: _first_word(r) == c["word"].lower(),
    "include_number": lambda c, r: re.search(r"\d", r) is not None,
    "no_comma": lambda c, r: "," not in r,
    "quotation": lambda c, r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
}

# Required parameters per type (used by the loader to validate stored specs).
PARAMS: dict[str, dict[str, type]] = {
    "max_words": {"n": int}, "min_words": {"n": int}, "max_sentences": {"n": int},
    "include_words": {"words": list}, "forbid_words": {"words": list},
    "lowercase": {}, "uppercase": {}, "bullets": {"n": int}, "numbered": {"n": int}, "json": {"keys": list},
    "end_with": {"phrase": str}, "paragraphs": {"n": int}, "start_with": {"word": str},
    "include_number": {}, "no_comma": {}, "quotation": {},
}

DESCRIBE: dict[str, Callable[[Constraint], str]] = {
    "max_words": lambda c: f"Use at most {c['n']} words.",
    "min_words": lambda c: f"Use at least {c['n']} words.",
    "max_sentences": lambda c: f"Use at most {c['n']} sentences.",
    "include_words": lambda c: "Include the words " + " and ".join(f'"{w}"' for w in c["words"]) + ".",
    "forbid_words": lambda c: "Do not use the words " + " or ".join(f'"{w}"' for w in c["words"]) + ".",
    "lowercase": lambda c: "Write everything in lowercase letters; no capital letters at all.",
    "uppercase": lambda c: "Write your entire answer in capital letters.",
    "bullets": lambda c: f"Format the answer as exactly {c['n']} bullet points, each line starting with \"- \".",
    "numbered": lambda c: f"Give exactly {c['n']} numbered points (1., 2., ...).",
    "json": lambda c: "Reply only with a JSON object with the string fields " + " and ".join(f'"{k}"' for k in c["keys"]) + ".",
    "end_with": lambda c: f'End your answer with the exact phrase "{c["phrase"]}"',
    "paragraphs": lambda c: f"Write exactly {c['n']} paragraphs separated by blank lines.",
    "start_with": lambda c: f'Start your answer with the word "{c["word"]}".',
    "include_number": lambda c: "Include at least one number written in digits.",
    "no_comma": lambda c: "Do not use any commas.",
    "quotation": lambda c: "Wrap your entire answer in double quotation marks.",
}


def describe(c: Constraint) -> str:
    return DESCRIBE[c["type"]](c)


def check(c: Constraint, response: str) -> bool:
    """Whether ``response`` satisfies constraint ``c``."""
    try:
        fn = CHECKS[c["type"]]
    except KeyError:
        raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {', '.join(CHECKS)}") from None
    return bool(fn(c, response))


def satisfied(constraints: Sequence[Constraint], response: str) -> list[bool]:
    return [check(c, response) for c in constraints]


def satisfies_all(constraints: Sequence[Constraint], response: str) -> bool:
    return all(satisfied(constraints, response)) and count_words(response) > 0


# ---------------------------------------------------------------------------
# Gold score
# ---------------------------------------------------------------------------

QUALITY_WEIGHT = 0.2
MIN_ADEQUATE_WORDS = 12


def quality(response: str, topic_words: Iterable[str] = ()) -> float:
    """A small quality term in [0, 1]: mean of three parts.

    * length adequacy: min(1, words / 12) - one-word answers are not answers;
    * non-repetition: min(1, distinct-word share / 0.5) times the share of
      sentences that are not verbatim repeats - loops and copy-paste lose;
    * on topic: 1 if any topic word appears (when ``topic_words`` is given), else 0.
    """
    w = [x.lower() for x in words(response)]
    if not w:
        return 0.0
    length = min(1.0, len(w) / MIN_ADEQUATE_WORDS)
    sents = [s.lower() for s in split_sentences(response)] or [response.lower()]
    unique_sents = len(set(sents)) / len(sents)
    rep = min(1.0, (len(set(w)) / len(w)) / 0.5) * unique_sents
    tw = [t.lower() for t in topic_words]
    parts = [length, rep]
    if tw:
        parts.append(1.0 if any(_has_word(response, t) for t in tw) else 0.0)
    return sum(parts) / len(parts)


def gold_score(constraints: Sequence[Constraint], response: str, topic_words: Iterable[str] = ()) -> float:
    """Gold score in [0, 1]: 0.8 x (fraction of constraints satisfied) + 0.2 x :func:`quality`.

    An answer with no words scores 0 whatever it "satisfies" (an empty string
    trivially avoids forbidden words). The 0.2 quality weight is small enough
    that satisfying one more constraint (worth 0.8 / #constraints >= 0.16 with
    at most 5 constraints) usually beats any quality difference, and large
    enough that among equally compliant answers the degenerate one loses.
    """
    if count_words(response) == 0:
        return 0.0
    frac = sum(satisfied(constraints, response)) / len(constraints) if constraints else 1.0
    return (1.0 - QUALITY_WEIGHT) * frac + QUALITY_WEIGHT * quality(response, topic_words)


# ---------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------

GENERIC_FILLER = (
    "The main idea is to keep things clear and practical.",
    "Start with the basics and build from there.",
    "Small steady steps work better than big leaps.",
    "Ask for help when something is unclear.",
    "Check your progress now and then to stay on track.",
    "Good habits make the rest much easier.",
    "Clear goals help you decide what matters most.",
    "Take notes so you can remember what worked.",
)


def topic_filler(topic: str | None) -> list[str]:
    """Neutral on-topic sentences used to pad or replace missing content."""
    if not topic:
        return list(GENERIC_FILLER)
    t = topic.strip()
    T = t[0].upper() + t[1:]
    return [
        f"{T} is easier to understand when you start with the basics.",
        f"A good first step with {t} is to learn the key terms.",
        f"Many people find that {t} rewards steady practice.",
        f"It helps to set a clear goal before diving into {t}.",
        f"Looking at real examples makes {t} more concrete.",
        f"Common mistakes with {t} come from rushing the early steps.",
        f"Talking with others who know {t} can save a lot of time.",
        f"Over time {t} becomes familiar and much less confusing.",
    ] + list(GENERIC_FILLER)


def _content_sentences(text: str) -> list[str]:
    """Plain sentences recovered from any text: JSON values, list items, paragraphs."""
    obj = _json_obj(text)
    if obj is not None:
        text = " ".join(str(v) for v in obj.values() if isinstance(v, (str, int, float)))
    out, seen = [], set()
    for line in strip_code_fence(text).splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", line).strip().strip('"').strip()
        for s in split_sentences(line):
            s = s.strip().strip('"').strip()
            key = s.lower()
            if count_words(s) < 3 or key in seen:
                continue  # fragments and verbatim repeats are not content
            seen.add(key)
            out.append(s if s[-1] in ".!?" else s + ".")
    return out


def _drop_words(s: str, banned: Sequence[str]) -> str:
    for w in banned:
        s = re.sub(r"(?<!\w)" + re.escape(w) + r"(?!\w)", "", s, flags=re.IGNORECASE)
    s = re.sub(r"\s+([.,!?;:])", r"\1", re.sub(r"[ \t]+", " ", s)).strip()
    return s


def _split_even(items: list, k: int) -> list[list]:
    n = len(items)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(k)]


def _lower_first(s: str) -> str:
    if len(s) > 1 and s[0].isupper() and not s[1].isupper() and not s.startswith("I "):
        return s[0].lower() + s[1:]
    return s


def _render(c: dict[str, Constraint], sents: list[str]) -> str:
    start = c.get("start_with")
    end = c.get("end_with")
    if "json" in c:
        keys = c["json"]["keys"]
        slots = _split_even(sents, len(keys))
        text = json.dumps({k: " ".join(v) for k, v in zip(keys, slots)}, indent=2, ensure_ascii=False)
    elif "bullets" in c or "numbered" in c:
        k = (c.get("bullets") or c.get("numbered"))["n"]
        slots = _split_even(sents, k)
        mark = (lambda i: "- ") if "bullets" in c else (lambda i: f"{i + 1}. ")
        lines = [mark(i) + " ".join(s) for i, s in enumerate(slots)]
        if start:
            lines.insert(0, f"{start['word']} here is a short list.")
        if end:
            lines.append(end["phrase"])
        text = "\n".join(lines)
    else:
        k = c["paragraphs"]["n"] if "paragraphs" in c else 1
        slots = [list(s) for s in _split_even(sents, k)]
        if start:
            slots[0][0] = f"{start['word']} " + _lower_first(slots[0][0])
        if end:
            slots[-1].append(end["phrase"])
        text = "\n\n".join(" ".join(s) for s in slots)
    if "quotation" in c:
        text = f'"{text}"'
    if "lowercase" in c:
        text = text.lower()
    if "uppercase" in c:
        text = text.upper()
    if "no_comma" in c:
        text = re.sub(r",\s*", " ", text)
    return text


def _slots(c: dict[str, Constraint]) -> int:
    if "json" in c:
        return len(c["json"]["keys"])
    for key in ("bullets", "numbered", "paragraphs"):
        if key in c:
            return c[key]["n"]
    return 1


class RepairError(ValueError):
    """The constraints cannot all be met together (e.g. a word limit too small)."""


def repair(constraints: Sequence[Constraint], text: str, topic: str | None = None, max_words: int | None = None) -> str:
    """Edit ``text`` into a response that satisfies every constraint.

    Keeps the text's own sentences where it can (list markers, JSON and
    repeats are stripped; forbidden words removed), adds what is required
    (included words, a number), pads with on-topic filler sentences, trims to
    the length limits, then lays the sentences out in the required structure
    (bullets, numbered list, paragraphs, JSON) and applies casing, quoting and
    punctuation rules. Raises :class:`RepairError` if the result still fails a
    check (only for infeasible constraint sets; the generator never makes those).

    ``max_words`` is a soft length budget on top of the constraints: the answer
    must fit in the policy's response limit (a demonstration cut off at
    ``max_new_tokens`` teaches the model to be cut off). Free sentences are
    dropped or shortened to meet it where the constraints allow (a ``min_words``
    constraint wins); it is never a reason to fail.
    """
    c = {x["type"]: x for x in constraints}
    banned = c["forbid_words"]["words"] if "forbid_words" in c else []

    def clean(ss):
        out = []
        for s in ss:
            s = _drop_words(s, banned)
            if count_words(s) >= 3:
                out.append(s if s[-1] in ".!?" else s + ".")
        return out

    sents = clean(_content_sentences(text))
    filler = [s for s in clean(topic_filler(topic)) if s.lower() not in {x.lower() for x in sents}]
    # Required sentences are protected from trimming (InstructGPT's labelers were
    # asked to follow explicit constraints first, Table 3).
    required = []
    if "include_words" in c:
        required.append(f"This answer covers {' and '.join(c['include_words']['words'])}.")
    if "include_number" in c and not any(re.search(r"\d", s) for s in required):
        required.append("Step 1 is to start small.")
    k = _slots(c)
    while len(sents) + len(required) < k:
        sents.append(filler.pop(0) if filler else f"Point {len(sents) + 1} is worth a moment of thought.")

    def build(body):
        return _render(c, body + required)

    limit = min([x for x in (c.get("max_words", {}).get("n"), max_words) if x is not None], default=None)
    if "min_words" in c and limit is not None:
        limit = max(limit, c["min_words"]["n"])  # the constraint wins over the soft budget

    def over(t):
        return (limit is not None and count_words(t) > limit) or (
            "max_sentences" in c and count_sentences(t) > c["max_sentences"]["n"])

    out = build(sents)
    while over(out) and len(sents) + len(required) > k and sents:
        sents.pop()
        out = build(sents)
    while over(out) and limit is not None:
        # shorten the longest free sentence, keeping at least three words
        idx = max(range(len(sents)), key=lambda i: count_words(sents[i]), default=None)
        if idx is None or count_words(sents[idx]) <= 3:
            break
        ws = sents[idx].rstrip(".!?").split()
        sents[idx] = " ".join(ws[:-1]) + "."
        out = build(sents)
    while "min_words" in c and count_words(out) < c["min_words"]["n"]:
        extra = filler.pop(0) if filler else f"Point {len(sents) + 1} is worth a moment of thought."
        if sents and over(build(sents + [extra])):
            # at the sentence limit: lengthen the last free sentence instead of adding one
            sents[-1] = sents[-1].rstrip(".!?") + " and " + _lower_first(extra)
        else:
            sents.append(extra)
        out = build(sents)
    bad = [x["type"] for x in constraints if not check(x, out)]
    if bad or count_words(out) == 0:
        raise RepairError(f"could not satisfy {bad} together with {[x['type'] for x in constraints]}")
    return out


# ---------------------------------------------------------------------------
# Validation of stored specs
# ---------------------------------------------------------------------------


def validate_constraint(c: Any) -> str | None:
    """None if ``c`` is a well-formed constraint, else a message saying what is wrong."""
    if not isinstance(c, dict) or "type" not in c:
        return "each constraint must be an object with a 'type'"
    t = c["type"]
    if t not in PARAMS:
        return f"unknown constraint type {t!r}; known: {', '.join(PARAMS)}"
    for name, typ in PARAMS[t].items():
        v = c.get(name)
        if not isinstance(v, typ) or isinstance(v, bool):
            return f"{t} needs {name!r} of type {typ.__name__}, got {v!r}"
        if typ is int and v < 1:
            return f"{t}.{name} must be >= 1, got {v}"
        if typ is list and (not v or not all(isinstance(x, str) and x.strip() for x in v)):
            return f"{t}.{name} must be a non-empty list of non-empty strings"
        if typ is str and not v.strip():
            return f"{t}.{name} must not be empty"
    return None
