"""Feedback data: typed records and validated loaders (see docs/data-formats.md).

Every loader takes a JSONL path (``.jsonl`` or ``.jsonl.gz``) or a
``datasets.Dataset`` / list of dicts, checks every row, and raises
:class:`~instructrl.io.DataError` naming the file, line and field of the first
bad one. Nothing is silently dropped.

Prompts are kept as chat messages (``[{"role": "user", "content": ...}]``); a
plain-text prompt becomes one user message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from instructrl.io import DataError, read_jsonl

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")

# The metadata flags of InstructGPT's rating task (Table 3 / Appendix B).
RATING_FLAGS = (
    "fails_to_follow_instruction",
    "hallucination",
    "inappropriate_for_customer_assistant",
    "sexual_content",
    "violent_content",
    "denigrates_protected_class",
    "harmful_advice",
    "expresses_opinion",
    "moral_judgement",
    "follows_explicit_constraints",
)


@dataclass
class PromptRecord:
    id: str
    messages: Messages
    user_id: str | None = None


@dataclass
class Demonstration:
    id: str
    messages: Messages
    response: str
    user_id: str | None = None
    labeler_id: str | None = None


@dataclass
class Ranking:
    """K >= 2 responses to one prompt, ordered best -> worst.

    ``ranks[i]`` is the rank of ``responses[i]`` (0 = best); equal ranks are ties
    and give no comparison. Pairwise data is the K = 2 case.
    """

    id: str
    messages: Messages
    responses: list[str]
    ranks: list[int]
    labeler_id: str | None = None
    user_id: str | None = None

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """(winner index, loser index) for every untied pair."""
        return [
            (i, j) if self.ranks[i] < self.ranks[j] else (j, i)
            for i in range(self.k)
            for j in range(i + 1, self.k)
            if self.ranks[i] != self.ranks[j]
        ]


@dataclass
class Rating:
    id: str
    messages: Messages
    response: str
    rating: int  # 1..7 Likert, 7 best
    flags: dict[str, bool] = field(default_factory=dict)
    labeler_id: str | None = None


# ---------------------------------------------------------------------------
# Row sources
# ---------------------------------------------------------------------------

Source = str | Path | Iterable[dict]


def iter_rows(src: Source, on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield (source name, 1-based line or row number, row) from a file or dataset.

    A row that is not a mapping raises, or goes to ``on_error`` and is skipped.
    """
    if isinstance(src, (str, Path)):
        for i, row in read_jsonl(src, on_error, allow_nan=False):  # a NaN score or label is garbage, not data
            yield str(src), i, row
        return
    name = getattr(src, "info", None)
    name = f"dataset {getattr(name, 'dataset_name', None) or type(src).__name__}"
    for i, row in enumerate(src, start=1):
        if not isinstance(row, dict):
            err = DataError(name, i, None, f"expected a mapping row, got {type(row).__name__}")
            if on_error is None:
                raise err
            on_error(err)
            continue
        yield name, i, row


def _rows(src: Source, on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[str, int, dict]]:
    """``iter_rows`` with ``None`` values dropped: a ``datasets.Dataset`` holding rows of
    different layouts fills every absent column with ``None``, and a JSON ``null``
    means the same as leaving the key out."""
    for s, i, row in iter_rows(src, on_error):
        yield s, i, {k: v for k, v in row.items() if v is not None}


# ---------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------

# Characters that render as nothing (zero-width space/joiners, BOM, word joiner): text made only of
# these and whitespace is empty, in a data file as in the labeling app's forms.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\ufeff\u2060"))


def is_blank(text: str) -> bool:
    """True when ``text`` is only whitespace and zero-width characters."""
    return not text.translate(INVISIBLE).strip()



def _text(row: dict, key: str, src: str, line: int, allow_empty: bool = False) -> str:
    if key not in row:
        raise DataError(src, line, key, "missing")
    v = row[key]
    if not isinstance(v, str):
        raise DataError(src, line, key, f"must be a string, got {type(v).__name__}")
    if not allow_empty and is_blank(v):
        raise DataError(src, line, key, "is empty")
    return v


def _opt_id(row: dict, key: str, src: str, line: int) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise DataError(src, line, key, f"must be a string or integer, got {type(v).__name__}")
    return str(v)


def parse_messages(value: Any, src: str, line: int, key: str) -> Messages:
    """A prompt as text or as a list of {role, content} messages."""
    if isinstance(value, str):
        if is_blank(value):
            raise DataError(src, line, key, "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(src, line, key, "must be a non-empty string or a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        f = f"{key}[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(src, line, f, "each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(src, line, f"{f}.role", f"must be one of {list(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(src, line, f"{f}.content", "must be a string")
        if m["role"] == "user" and is_blank(m["content"]):  # a system message may be empty; a question may not
            raise DataError(src, line, f"{f}.content", "is empty")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise DataError(src, line, key, "the last prompt message must not be the assistant's (that is the response)")
    return out


def _row_id(row: dict, src: str, line: int) -> str:
    rid = _opt_id(row, "id", src, line)
    return rid if rid is not None else f"{Path(src).name}:{line}"


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def load_prompts(src: Source) -> list[PromptRecord]:
    """Rows ``{"id", "prompt" (text or messages), "user_id"?}``."""
    out, seen = [], {}
    for s, i, row in _rows(src):
        if "prompt" not in row:
            raise DataError(s, i, "prompt", "missing")
        rec = PromptRecord(_row_id(row, s, i), parse_messages(row["prompt"], s, i, "prompt"), _opt_id(row, "user_id", s, i))
        if rec.id in seen:
            raise DataError(s, i, "id", f"duplicate id {rec.id!r} (first on line {seen[rec.id]})")
        seen[rec.id] = i
        out.append(rec)
    return out


def load_demonstrations(src: Source) -> list[Demonstration]:
    """Rows ``{"prompt", "response", "id"?, "user_id"?, "labeler_id"?}``."""
    out = []
    for s, i, row in _rows(src):
        if "prompt" not in row:
            raise DataError(s, i, "prompt", "missing")
        out.append(
            Demonstration(
                _row_id(row, s, i), parse_messages(row["prompt"], s, i, "prompt"), _text(row, "response", s, i),
                _opt_id(row, "user_id", s, i), _opt_id(row, "labeler_id", s, i),
            )
        )
    return out


def load_ratings(src: Source) -> list[Rating]:
    """Rows ``{"prompt", "response", "rating" 1..7, "flags"? {name: bool}, "labeler_id"?}``."""
    out = []
    for s, i, row in _rows(src):
        if "prompt" not in row:
            raise DataError(s, i, "prompt", "missing")
        r = row.get("rating")
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 7:
            raise DataError(s, i, "rating", f"must be an integer from 1 to 7, got {r!r}")
        flags = row.get("flags") or {}
        if not isinstance(flags, dict):
            raise DataError(s, i, "flags", "must be a mapping of flag name to true/false")
        for k, v in flags.items():
            if k not in RATING_FLAGS:
                raise DataError(s, i, f"flags.{k}", f"unknown flag; known flags: {', '.join(RATING_FLAGS)}")
            if not isinstance(v, bool):
                raise DataError(s, i, f"flags.{k}", "must be true or false")
        out.append(
            Rating(_row_id(row, s, i), parse_messages(row["prompt"], s, i, "prompt"), _text(row, "response", s, i),
                   r, dict(flags), _opt_id(row, "labeler_id", s, i))
        )
    return out


def load_rankings(src: Source, errors: str = "raise", skipped: list[DataError] | None = None) -> list[Ranking]:
    """Rankings and pairwise comparisons, line by line (layouts may be mixed).

    Accepted layouts (docs/data-formats.md):
      * ranking: ``{"prompt", "responses": [K], "ranking"?: permutation best-first, "ties"?: [[i, j], ...]}``
      * pairwise: ``{"prompt", "chosen": str, "rejected": str}``
      * chat pairwise: ``{"chosen": [messages], "rejected": [messages]}`` sharing all but the last turn
      * HH-RLHF transcripts: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``

    ``errors="raise"`` (default) stops at the first bad row. ``errors="skip"``
    leaves bad rows out but never silently: each one's DataError is appended to
    ``skipped`` (if given) and the count is printed as a warning. Real public
    data needs this (e.g. HH-RLHF has a few empty replies).
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    out, bad = [], []
    for s, i, row in _rows(src, bad.append if errors == "skip" else None):
        try:
            if "responses" in row:
                out.append(_parse_ranking(row, s, i))
            elif "chosen" in row or "rejected" in row:
                out.append(_parse_pairwise(row, s, i))
            else:
                raise DataError(s, i, "responses", "missing: a ranking needs 'responses' (or 'chosen'/'rejected' for a pair)")
        except DataError as e:
            if errors == "raise":
                raise
            bad.append(e)
    if bad:
        import warnings

        warnings.warn(f"skipped {len(bad)} invalid rows; first: {bad[0]}", stacklevel=2)
        if skipped is not None:
            skipped.extend(bad)
    return out


def _parse_ranking(row: dict, s: str, i: int) -> Ranking:
    if "prompt" not in row:
        raise DataError(s, i, "prompt", "missing")
    messages = parse_messages(row["prompt"], s, i, "prompt")
    resp = row["responses"]
    if not isinstance(resp, list):
        raise DataError(s, i, "responses", "must be a list of strings")
    if len(resp) < 2:
        raise DataError(s, i, "responses", f"a ranking needs K >= 2 responses, got {len(resp)}")
    for j, r in enumerate(resp):
        if not isinstance(r, str):
            raise DataError(s, i, f"responses[{j}]", "must be a string")
        if is_blank(r):
            raise DataError(s, i, f"responses[{j}]", "is empty")
    first = {}
    for j, r in enumerate(resp):
        if r in first:
            raise DataError(s, i, f"responses[{j}]", f"duplicate of responses[{first[r]}] in the same ranking")
        first[r] = j
    k = len(resp)
    order = row.get("ranking", list(range(k)))
    if (not isinstance(order, list) or not all(_is_index(o) for o in order)
            or sorted(order) != list(range(k))):
        raise DataError(s, i, "ranking", f"must be a permutation of 0..{k - 1} (best first), got {order!r}")
    ranks = [0] * k
    for pos, j in enumerate(order):
        ranks[j] = pos
    ties = row.get("ties") or []
    if not isinstance(ties, list):
        raise DataError(s, i, "ties", "must be a list of groups of response indices")
    tied_in: dict[int, int] = {}
    for g, group in enumerate(ties):
        f = f"ties[{g}]"
        if (not isinstance(group, list) or len(group) < 2 or len(set(group)) != len(group)
                or not all(_is_index(x) and x < k for x in group)):
            raise DataError(s, i, f, f"must list two or more distinct response indices in 0..{k - 1}, got {group!r}")
        for x in group:
            if x in tied_in:
                raise DataError(s, i, f, f"response {x} is already in ties[{tied_in[x]}]; merge the two groups")
            tied_in[x] = g
        # A tie group must be a run of neighbours in the ranking: tying 1st and 3rd
        # while 2nd sits between them contradicts the ranking itself.
        positions = sorted(ranks[x] for x in group)
        if positions[-1] - positions[0] != len(group) - 1:
            raise DataError(s, i, f, f"tied responses must be neighbours in the ranking, got positions {positions}")
        for x in group:
            ranks[x] = positions[0]
    if len(set(ranks)) == 1:
        raise DataError(s, i, "ties", "all responses are tied: the ranking gives no comparison")
    perm = sorted(range(k), key=lambda j: ranks[j])
    return Ranking(
        _row_id(row, s, i), messages, [resp[j] for j in perm], [ranks[j] for j in perm],
        _opt_id(row, "labeler_id", s, i), _opt_id(row, "user_id", s, i),
    )


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str, s: str = "<text>", i: int = 0, key: str = "chosen") -> tuple[Messages, str]:
    """Split an HH-RLHF transcript into (prompt messages, last assistant reply).

    ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d"`` gives
    prompt = [user a, assistant b, user c] and response = ``d``.
    """
    parts = HH_TURN.split(text)
    # parts = [preamble, role, content, role, content, ...]
    if len(parts) < 5 or parts[0].strip():
        raise DataError(s, i, key, "not an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [(parts[j], parts[j + 1]) for j in range(1, len(parts), 2)]
    if turns[-1][0] != "Assistant":
        raise DataError(s, i, key, "transcript must end with an Assistant turn")
    messages = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in turns[:-1]]
    return messages, turns[-1][1].strip()


def _parse_pairwise(row: dict, s: str, i: int) -> Ranking:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(s, i, key, "missing")
    c, r = row["chosen"], row["rejected"]
    if "prompt" in row:
        messages = parse_messages(row["prompt"], s, i, "prompt")
        chosen = _assistant_text(c, s, i, "chosen")
        rejected = _assistant_text(r, s, i, "rejected")
    elif isinstance(c, str) and isinstance(r, str):
        messages, chosen = parse_hh_transcript(c, s, i, "chosen")
        m2, rejected = parse_hh_transcript(r, s, i, "rejected")
        if m2 != messages:
            raise DataError(s, i, "rejected", "the two transcripts differ before the last Assistant turn")
    elif isinstance(c, list) and isinstance(r, list):
        for key, conv in (("chosen", c), ("rejected", r)):
            if not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
                raise DataError(s, i, key, "a chat pair must be a message list ending with an assistant message")
        messages = parse_messages(c[:-1], s, i, "chosen")
        if parse_messages(r[:-1], s, i, "rejected") != messages:
            raise DataError(s, i, "rejected", "chosen and rejected conversations differ before the last turn")
        chosen, rejected = _assistant_text(c, s, i, "chosen"), _assistant_text(r, s, i, "rejected")
    else:
        raise DataError(s, i, "chosen", "chosen/rejected must both be strings or both message lists")
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if is_blank(v):
            raise DataError(s, i, key, "response is empty")
    if chosen == rejected:
        raise DataError(s, i, "rejected", "identical to chosen: the pair gives no comparison")
    return Ranking(_row_id(row, s, i), messages, [chosen, rejected], [0, 1], _opt_id(row, "labeler_id", s, i),
                   _opt_id(row, "user_id", s, i))


def _assistant_text(v: Any, s: str, i: int, key: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and isinstance(v[-1], dict) and v[-1].get("role") == "assistant":
        content = v[-1].get("content")
        if isinstance(content, str):
            return content
    raise DataError(s, i, key, "must be a string or a message list ending with an assistant message")


# ---------------------------------------------------------------------------
# Writers (the inverse of the loaders, used by exports and the pipeline)
# ---------------------------------------------------------------------------


def prompt_row(p: PromptRecord) -> dict:
    return {"id": p.id, "prompt": p.messages, **({"user_id": p.user_id} if p.user_id else {})}


def demonstration_row(d: Demonstration) -> dict:
    row = {"id": d.id, "prompt": d.messages, "response": d.response}
    row.update({k: v for k, v in (("user_id", d.user_id), ("labeler_id", d.labeler_id)) if v})
    return row


def ranking_row(r: Ranking) -> dict:
    """Responses best-first; tied neighbours are written as ``ties`` groups.

    The responses are sorted by rank first, so a ``Ranking`` built in any order
    is written correctly (the file layout has no ``ranking`` key: file order is
    the ranking).
    """
    perm = sorted(range(r.k), key=lambda j: r.ranks[j])
    ranks = [r.ranks[j] for j in perm]
    row: dict[str, Any] = {"id": r.id, "prompt": r.messages, "responses": [r.responses[j] for j in perm]}
    groups: dict[int, list[int]] = {}
    for j, rank in enumerate(ranks):
        groups.setdefault(rank, []).append(j)
    ties = [g for g in groups.values() if len(g) > 1]
    if ties:
        row["ties"] = ties
    row.update({k: v for k, v in (("labeler_id", r.labeler_id), ("user_id", r.user_id)) if v})
    return row


def rating_row(r: Rating) -> dict:
    row = {"id": r.id, "prompt": r.messages, "response": r.response, "rating": r.rating, "flags": r.flags}
    if r.labeler_id:
        row["labeler_id"] = r.labeler_id
    return row


def load_text_corpus(src: Source, field_name: str = "text") -> list[str]:
    """Plain-text rows ``{"text": ...}`` (pretraining data for PPO-ptx)."""
    return [_text(row, field_name, s, i) for s, i, row in _rows(src)]


def require_rows(rows: list, src: Source, what: str, minimum: int = 1) -> list:
    """``rows`` unchanged, or DataError when there are fewer than ``minimum``: an empty (or
    too small) input file must stop a command, not let it train nothing and exit 0."""
    if len(rows) < minimum:
        name = str(src) if isinstance(src, (str, Path)) else f"dataset {type(src).__name__}"
        need = "at least one" if minimum == 1 else f"at least {minimum}"
        raise DataError(name, None, None, f"needs {need} {what}{'' if minimum == 1 else '(s)'}, found {len(rows)}")
    return rows


LOADERS: dict[str, Callable[[Source], list]] = {
    "prompts": load_prompts,
    "demonstrations": load_demonstrations,
    "rankings": load_rankings,
    "ratings": load_ratings,
}
