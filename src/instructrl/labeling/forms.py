"""Validation of submitted answers (pure; unit-tested): every refusal is a 4xx LabelError."""

from __future__ import annotations

from instructrl.data import RATING_FLAGS, is_blank
from instructrl.labeling.store import LabelError


def parse_order(raw: str | None, k: int) -> list[int]:
    """``"2,0,1,3"`` -> [2, 0, 1, 3]; must be a permutation of 0..k-1 (best first)."""
    try:
        order = [int(x) for x in (raw or "").split(",") if x.strip() != ""]
    except ValueError:
        raise LabelError(400, f"invalid ranking {raw!r}: expected comma-separated completion numbers") from None
    if sorted(order) != list(range(k)):
        raise LabelError(400, f"invalid ranking {raw!r}: must order each of the {k} completions exactly once "
                              f"(a permutation of 0..{k - 1}, best first)")
    return order


def parse_submission(kind: str, form, k: int, max_chars: int) -> dict:
    """Turn a task form into the stored payload, or raise a 4xx LabelError."""
    if kind == "demonstration":
        text = str(form.get("response") or "").strip()
        if is_blank(text):
            raise LabelError(400, "the demonstration is empty")
        if len(text) > max_chars:
            raise LabelError(413, f"the demonstration is {len(text)} characters; the limit is {max_chars}")
        return {"response": text}
    if kind == "rank":
        return {"order": parse_order(form.get("order"), k), "all_bad": form.get("all_bad") in ("on", "true", "1")}
    if kind == "rate":
        try:
            rating = int(form.get("rating") or "")
        except ValueError:
            raise LabelError(400, f"rating must be a whole number from 1 to 7, got {form.get('rating')!r}") from None
        if not 1 <= rating <= 7:
            raise LabelError(400, f"rating must be from 1 to 7, got {rating}")
        unknown = [key[5:] for key in form.keys() if key.startswith("flag_") and key[5:] not in RATING_FLAGS]
        if unknown:
            raise LabelError(400, f"unknown flags {unknown}; known: {', '.join(RATING_FLAGS)}")
        flags = {f: form.get(f"flag_{f}") in ("on", "true", "1") for f in RATING_FLAGS}
        return {"rating": rating, "flags": flags}
    raise LabelError(400, f"{kind} tasks are answered turn by turn, not with one form")
