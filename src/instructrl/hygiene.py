"""Prompt hygiene before labeling or training (InstructGPT, Ouyang et al. 2022, §3.2).

The paper: "We heuristically deduplicate prompts by checking for prompts that
share a long common prefix, and we limit the number of prompts to 200 per user
ID. We also create our train, validation, and test splits based on user ID, so
that the validation and test sets contain no data from users whose data is in
the training set. ... we filter all prompts in the training split for personally
identifiable information (PII)."

:func:`clean_prompts` applies, in this order:

1. **PII filter** (:data:`PII_PATTERNS`): each match is replaced by a tag such as
   ``[EMAIL]`` (``pii="redact"``), or the whole prompt is dropped
   (``pii="remove"``). Every match is counted by kind. We filter every split,
   not only train: a labeler sees validation prompts too.
2. **Dedupe**: two prompts are duplicates when their normalised text (lowercase,
   whitespace collapsed) shares a common prefix of at least
   ``dedupe_prefix_chars`` characters -- equivalently, the same first
   ``dedupe_prefix_chars`` characters; shorter prompts are duplicates only when
   identical. The first occurrence (file order) is kept.
3. **Per-user cap**: at most ``max_per_user`` prompts per user id (the first ones).
4. **Split by user id** (:func:`split_by_user`): every user's prompts go to one
   split. Prompts without a user id count as a user of their own.

``instructrl data prepare input=prompts.jsonl out=DIR`` runs this on a JSONL file
and writes ``DIR/{train,val,test}.jsonl`` and ``DIR/report.json``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from instructrl.config import check, param
from instructrl.data import PromptRecord, load_prompts, prompt_row, require_rows

# ---------------------------------------------------------------------------
# PII patterns. Each is documented with what it matches and what it misses;
# they are heuristics (like the paper's), tuned to avoid redacting ordinary text.
# ---------------------------------------------------------------------------

#: ``name@domain.tld`` -- RFC 5322's common subset (letters, digits, ``._%+-``).
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

#: Card numbers: 13-19 digits, optionally grouped by single spaces or dashes,
#: kept only when the Luhn checksum holds (so order numbers rarely match).
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")

#: Phone numbers: North American ``(555) 123-4567``, ``555.123.4567``,
#: ``+1 555 123 4567``, and international ``+44 20 7946 0958`` (a leading ``+``
#: and 8-15 digits in groups). Run after the card pattern, so card digits are gone.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-]?)\d{3}[\s.-]?\d{4}"  # NANP
    r"|\+\d{1,3}(?:[\s.-]?\d{1,4}){2,5}"  # international, must start with +
    r")(?!\w)"
)

#: Street addresses: a house number, one to four Capitalised words and a
#: capitalised street suffix: ``221B Baker Street``, ``1600 Pennsylvania Ave``.
#: Lowercase text such as "3 cats on the way" does not match.
ADDRESS_RE = re.compile(
    r"\b\d{1,6}[A-Za-z]?\s+(?:[A-Z][A-Za-z'.-]*\s+){1,4}"
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Circle|"
    r"Highway|Hwy|Square|Sq|Parkway|Pkwy)\b"
)

PII_KINDS = ("email", "card", "phone", "address")
PII_TAGS = {"email": "[EMAIL]", "card": "[CARD]", "phone": "[PHONE]", "address": "[ADDRESS]"}
PII_PATTERNS = {"email": EMAIL_RE, "card": CARD_RE, "phone": PHONE_RE, "address": ADDRESS_RE}


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = PII_KINDS) -> dict[str, int]:
    """Count PII matches by kind (without changing the text)."""
    return redact_pii(text, kinds)[1]


def redact_pii(text: str, kinds: tuple[str, ...] | list[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """Replace every PII match by its tag; returns (new text, count per kind).

    Kinds run in :data:`PII_KINDS` order (email, card, phone, address) so that a
    card number is never half-eaten by the phone pattern.
    """
    counts = {k: 0 for k in kinds}
    for kind in PII_KINDS:
        if kind not in kinds:
            continue
        pat = PII_PATTERNS[kind]

        def sub(m: re.Match, kind: str = kind) -> str:
            if kind == "card" and not luhn_ok(re.sub(r"\D", "", m.group(0))):
                return m.group(0)
            counts[kind] += 1
            return PII_TAGS[kind]

        text = pat.sub(sub, text)
    return text, counts


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclass
class HygieneConfig:
    dedupe_prefix_chars: int = param(
        100, "prompts whose normalised text shares a common prefix this long are duplicates (InstructGPT §3.2; "
        "the paper gives no number); 0 = no dedupe", min=0)
    max_per_user: int = param(200, "keep at most this many prompts per user id (InstructGPT §3.2: 200); 0 = no cap",
                              min=0)
    pii: Literal["redact", "remove", "off"] = param(
        "redact", "PII handling: redact = replace matches by [EMAIL]/[PHONE]/[CARD]/[ADDRESS]; remove = drop the prompt")
    pii_kinds: list[str] = param(factory=lambda: list(PII_KINDS), help="which PII patterns to apply")
    split_names: list[str] = param(factory=lambda: ["train", "val", "test"], help="split names")
    split_fractions: list[float] = param(factory=lambda: [0.8, 0.1, 0.1],
                                         help="target share of prompts per split (by user id; sums to 1)", min=0, max=1)
    seed: int = param(0, "seed of the user -> split assignment", min=0, max=2**32 - 1)

    def validate(self) -> None:
        check(self.dedupe_prefix_chars >= 0, "hygiene.dedupe_prefix_chars must be >= 0")
        check(self.max_per_user >= 0, "hygiene.max_per_user must be >= 0")
        bad = [k for k in self.pii_kinds if k not in PII_KINDS]
        check(not bad, f"hygiene.pii_kinds: unknown kinds {bad}; known: {list(PII_KINDS)}")
        check(len(self.split_names) == len(self.split_fractions) and self.split_names,
              "hygiene.split_names and hygiene.split_fractions must have the same (non-zero) length")
        check(len(set(self.split_names)) == len(self.split_names), "hygiene.split_names must be distinct")
        # each name becomes <out>/<name>.jsonl: '../x' would write outside out=, '' a hidden '.jsonl'
        bad = [n for n in self.split_names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
        check(not bad, f"hygiene.split_names: {bad[0]!r} is not a plain file name (letters, digits, '_', '-', '.'; "
                       "no '/' and not starting with '.')" if bad else "")
        check(all(f >= 0 for f in self.split_fractions) and abs(sum(self.split_fractions) - 1) < 1e-6,
              f"hygiene.split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")


@dataclass
class HygieneReport:
    input: int = 0
    pii_counts: dict[str, int] = field(default_factory=dict)  # matches per kind
    pii_prompts: int = 0  # prompts with at least one match
    pii_removed: int = 0  # prompts dropped (pii="remove")
    duplicates_removed: int = 0
    over_user_cap_removed: int = 0
    users_capped: int = 0
    kept: int = 0
    users: int = 0
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"prompts", "users"}

    def summary(self) -> str:
        pii = ", ".join(f"{k} {v}" for k, v in self.pii_counts.items())
        sp = ", ".join(f"{k} {v['prompts']} prompts / {v['users']} users" for k, v in self.splits.items())
        return (f"{self.input} prompts in; PII matches: {pii or 'none'} in {self.pii_prompts} prompts "
                f"({self.pii_removed} prompts removed); {self.duplicates_removed} duplicates removed; "
                f"{self.over_user_cap_removed} over the per-user cap removed ({self.users_capped} users capped); "
                f"{self.kept} kept from {self.users} users; splits: {sp}")


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_text(p: PromptRecord) -> str:
    return "\n".join(m["content"] for m in p.messages)


def user_key(p: PromptRecord) -> str:
    """Prompts without a user id each count as their own user (never merged)."""
    return f"user:{p.user_id}" if p.user_id is not None else f"prompt:{p.id}"


def dedupe_by_prefix(prompts: list[PromptRecord], prefix_chars: int) -> tuple[list[PromptRecord], int]:
    """Keep the first of each group sharing ``prefix_chars`` leading normalised characters."""
    if prefix_chars <= 0:
        return list(prompts), 0
    seen: set[str] = set()
    out = []
    for p in prompts:
        key = normalise(prompt_text(p))[:prefix_chars]
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out, len(prompts) - len(out)


def cap_per_user(prompts: list[PromptRecord], max_per_user: int) -> tuple[list[PromptRecord], int, int]:
    """(kept, number removed, number of users that hit the cap); prompts without user id are never capped."""
    if max_per_user <= 0:
        return list(prompts), 0, 0
    n: dict[str, int] = {}
    out = []
    for p in prompts:
        k = user_key(p)
        n[k] = n.get(k, 0) + 1
        if n[k] <= max_per_user:
            out.append(p)
    capped = sum(1 for v in n.values() if v > max_per_user)
    return out, len(prompts) - len(out), capped


def split_by_user(prompts: list[PromptRecord], names: list[str], fractions: list[float],
                  seed: int = 0) -> dict[str, list[PromptRecord]]:
    """Assign whole users to splits so each split's prompt count approaches its fraction.

    Users are shuffled (seeded) and each goes to the split furthest below its
    target share, so a user never spans two splits and a prolific user cannot
    tilt the split sizes much. Prompt order inside a split follows the input.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(user_key(p), []).append(i)
    users = sorted(groups)
    random.Random(seed).shuffle(users)
    total = len(prompts)
    counts = [0] * len(names)
    where: dict[int, int] = {}
    for u in users:
        # deficit = target - current; the largest deficit takes this user
        s = max(range(len(names)), key=lambda j: (fractions[j] * total - counts[j], -j))
        counts[s] += len(groups[u])
        for i in groups[u]:
            where[i] = s
    out: dict[str, list[PromptRecord]] = {n: [] for n in names}
    for i, p in enumerate(prompts):
        out[names[where[i]]].append(p)
    return out


def clean_prompts(prompts: list[PromptRecord], cfg: HygieneConfig) -> tuple[dict[str, list[PromptRecord]], HygieneReport]:
    """Run PII filter, dedupe, per-user cap and split (module docstring); returns (splits, report)."""
    rep = HygieneReport(input=len(prompts), pii_counts={k: 0 for k in cfg.pii_kinds})
    kept: list[PromptRecord] = []
    for p in prompts:
        if cfg.pii == "off":
            kept.append(p)
            continue
        new_msgs, hit = [], 0
        for m in p.messages:
            text, counts = redact_pii(m["content"], cfg.pii_kinds)
            for k, v in counts.items():
                rep.pii_counts[k] += v
                hit += v
            new_msgs.append({"role": m["role"], "content": text})
        if hit:
            rep.pii_prompts += 1
            if cfg.pii == "remove":
                rep.pii_removed += 1
                continue
        kept.append(PromptRecord(p.id, new_msgs, p.user_id))
    kept, rep.duplicates_removed = dedupe_by_prefix(kept, cfg.dedupe_prefix_chars)
    kept, rep.over_user_cap_removed, rep.users_capped = cap_per_user(kept, cfg.max_per_user)
    rep.kept = len(kept)
    rep.users = len({user_key(p) for p in kept})
    splits = split_by_user(kept, cfg.split_names, cfg.split_fractions, cfg.seed)
    rep.splits = {n: {"prompts": len(v), "users": len({user_key(p) for p in v})} for n, v in splits.items()}
    return splits, rep


# ---------------------------------------------------------------------------
# `instructrl data prepare`
# ---------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    input: str = param("", "prompts JSONL ({id, prompt, user_id}) to clean and split")
    out: str = param("", "output folder: <split>.jsonl per split and report.json")
    hygiene: HygieneConfig = param(HygieneConfig(), "prompt hygiene settings")

    def validate(self) -> None:
        check(bool(self.input), "input is required: input=prompts.jsonl")
        check(bool(self.out), "out is required: out=DIR")


def prepare_command(cfg: PrepareConfig) -> HygieneReport:
    """Write <split>.jsonl and report.json into ``out``, one atomic file at a time: ``out``
    may be the folder the input lives in, so nothing else in it is touched (never atomic_dir,
    which replaces the whole folder)."""
    from instructrl.io import OutputError, atomic_write_text, write_jsonl

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; out= names the output folder")
    prompts = require_rows(load_prompts(cfg.input), cfg.input, "prompt")
    splits, rep = clean_prompts(prompts, cfg.hygiene)
    targets = [out / f"{name}.jsonl" for name in splits] + [out / "report.json"]
    src = Path(cfg.input).resolve()
    if src in {t.resolve() for t in targets}:
        raise OutputError(cfg.input, f"the input would be overwritten by an output of the same name in {out}; "
                          "choose another out= folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", (prompt_row(p) for p in rows))
    atomic_write_text(out / "report.json", json.dumps(rep.__dict__, indent=2) + "\n")  # last: the run finished
    print(f"[instructrl] {rep.summary()}")
    print(f"[instructrl] wrote {', '.join(f'{n}.jsonl' for n in splits)} and report.json to {cfg.out}")
    return rep
