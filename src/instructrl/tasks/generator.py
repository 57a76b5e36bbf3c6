"""A seeded generator of instructions with explicit, checkable constraints.

Each :class:`ConstraintTask` is one prompt ("Explain how composting works. Use at
most 60 words. Include the word "soil". ...") with its machine-readable
constraint spec, a topic and a ``user_id``. Users follow a Zipf-like law (a few
users write many prompts, most write one or two), so the pipeline can hold out
whole users for evaluation as InstructGPT did (§3.2: splits by user ID).

Stored as JSON Lines ``{"id", "prompt", "user_id", "topic", "topic_words", "constraints": [...]}``
(:func:`save_tasks` / :func:`load_tasks`); the ``prompt`` field is plain text so
the same file also loads with :func:`instructrl.data.load_prompts`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from instructrl.data import PromptRecord, is_blank, iter_rows
from instructrl.io import DataError, write_jsonl
from instructrl.tasks.text import count_words, words
from instructrl.tasks.constraints import (
    Constraint, RepairError, describe, repair, satisfies_all, topic_filler, validate_constraint,
)

# (topic noun phrase, topic words used by the quality term and include_words)
TOPICS: list[tuple[str, list[str]]] = [
    ("composting at home", ["compost", "soil", "garden"]),
    ("learning to swim", ["swim", "water", "breathing"]),
    ("saving money on groceries", ["budget", "groceries", "prices"]),
    ("training for a first marathon", ["marathon", "running", "pace"]),
    ("keeping houseplants alive", ["plants", "light", "watering"]),
    ("writing a cover letter", ["letter", "employer", "skills"]),
    ("brewing good coffee", ["coffee", "beans", "grind"]),
    ("planning a road trip", ["route", "car", "trip"]),
    ("getting better sleep", ["sleep", "bedtime", "rest"]),
    ("learning a new language", ["language", "vocabulary", "practice"]),
    ("baking sourdough bread", ["bread", "dough", "starter"]),
    ("starting a vegetable garden", ["garden", "seeds", "soil"]),
    ("preparing for a job interview", ["interview", "questions", "employer"]),
    ("reducing screen time", ["screen", "phone", "habits"]),
    ("caring for a new puppy", ["puppy", "training", "walks"]),
    ("organizing a small kitchen", ["kitchen", "storage", "shelves"]),
    ("learning to play guitar", ["guitar", "chords", "practice"]),
    ("cycling to work", ["bike", "commute", "helmet"]),
    ("reading more books", ["books", "reading", "library"]),
    ("cooking rice on the stove", ["rice", "water", "pot"]),
    ("writing clear emails", ["email", "subject", "reader"]),
    ("staying safe while hiking", ["hiking", "trail", "water"]),
    ("choosing a laptop", ["laptop", "battery", "memory"]),
    ("teaching kids about money", ["money", "kids", "saving"]),
    ("recycling at the office", ["recycling", "paper", "bins"]),
    ("making a weekly meal plan", ["meals", "recipes", "shopping"]),
    ("backing up family photos", ["photos", "backup", "storage"]),
    ("meditating for beginners", ["meditation", "breathing", "calm"]),
    ("painting a bedroom wall", ["paint", "wall", "brush"]),
    ("giving a short presentation", ["presentation", "slides", "audience"]),
    ("birdwatching in a city park", ["birds", "park", "binoculars"]),
    ("repairing a flat bicycle tire", ["tire", "tube", "pump"]),
    ("studying for an exam", ["exam", "notes", "review"]),
    ("hosting a dinner party", ["dinner", "guests", "menu"]),
    ("reducing food waste", ["food", "leftovers", "fridge"]),
    ("taking better phone photos", ["photos", "light", "camera"]),
    ("keeping a daily journal", ["journal", "writing", "habit"]),
    ("learning basic first aid", ["bandage", "injury", "safety"]),
    ("moving to a new city", ["city", "neighborhood", "moving"]),
    ("volunteering locally", ["volunteer", "community", "time"]),
]

TASK_PHRASES = (
    "Explain {t} to a beginner.",
    "Give practical advice about {t}.",
    "Describe how to get started with {t}.",
    "What should someone know about {t}?",
    "Write a short guide to {t}.",
    "Share some tips on {t}.",
)

# Vocabulary pools. Forbidden words are chosen from filler-ish words that never
# appear in start words, end phrases, JSON keys or include words (see _pick).
FORBID_POOL = ("very", "really", "basically", "actually", "simply", "just", "thing", "things", "stuff",
               "good", "easy", "important", "always", "never", "great", "help")
INCLUDE_EXTRA = ("example", "patience", "plan", "mistake", "routine", "goal", "beginner", "progress")
START_WORDS = ("Honestly", "Overall", "First", "Certainly", "Briefly", "Essentially", "Sure", "Today", "Well", "Yes")
END_PHRASES = ("Hope this helps.", "That is all for now.", "Is there anything else I can help with?",
               "Any other questions?", "Happy learning!", "Good luck!")
JSON_KEYS = (("summary", "tips"), ("answer",), ("overview", "steps", "warning"), ("title", "body"), ("advice", "reason"))

# Pairs of types that cannot be combined (structure, casing and layout clashes).
STRUCTURE = ("bullets", "numbered", "paragraphs", "json")
CONFLICTS: set[frozenset] = {
    frozenset(p) for p in [
        ("lowercase", "uppercase"), ("max_words", "min_words"),
        ("json", "start_with"), ("json", "end_with"), ("json", "max_sentences"), ("json", "quotation"),
        ("json", "uppercase"), ("json", "no_comma"), ("max_sentences", "bullets"), ("max_sentences", "numbered"),
        ("quotation", "bullets"), ("quotation", "numbered"),
    ]
} | {frozenset((a, b)) for a in STRUCTURE for b in STRUCTURE if a != b}

TYPE_WEIGHTS = {
    "max_words": 3, "min_words": 2, "max_sentences": 2, "include_words": 3, "forbid_words": 3,
    "lowercase": 1.5, "uppercase": 1, "bullets": 2, "numbered": 2, "json": 1.5, "end_with": 2.5,
    "paragraphs": 1.5, "start_with": 2.5, "include_number": 1.5, "no_comma": 1.5, "quotation": 1,
}


@dataclass
class ConstraintTask:
    id: str
    prompt: str  # the full instruction text shown to the policy
    user_id: str
    topic: str
    topic_words: list[str]
    constraints: list[Constraint] = field(default_factory=list)

    def to_prompt_record(self) -> PromptRecord:
        return PromptRecord(self.id, [{"role": "user", "content": self.prompt}], self.user_id)

    def to_row(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "user_id": self.user_id, "topic": self.topic,
                "topic_words": list(self.topic_words), "constraints": [dict(c) for c in self.constraints]}


def _params(t: str, rng: random.Random, topic_words: Sequence[str], used: set[str],
            budget: int | None = None) -> Constraint:
    if t == "max_words":
        return {"type": t, "n": rng.choice([30, 40, 50, 60, 80, 100])}
    if t == "min_words":
        ns = [20, 30, 40, 60]
        if budget is not None:  # leave room inside the response budget for structure and required phrases
            ns = [n for n in ns if n <= 0.75 * budget] or [ns[0]]
        return {"type": t, "n": rng.choice(ns)}
    if t == "max_sentences":
        return {"type": t, "n": rng.randint(2, 5)}
    if t == "include_words":
        pool = [w for w in list(topic_words) + list(INCLUDE_EXTRA) if w not in used]
        ws = rng.sample(pool, rng.choice([1, 2]))
        used.update(ws)
        return {"type": t, "words": ws}
    if t == "forbid_words":
        pool = [w for w in FORBID_POOL if w not in used and w not in topic_words]
        ws = rng.sample(pool, rng.choice([1, 2, 3]))
        used.update(ws)
        return {"type": t, "words": ws}
    if t in ("bullets", "numbered"):
        return {"type": t, "n": rng.randint(2, 5)}
    if t == "paragraphs":
        return {"type": t, "n": rng.randint(2, 4)}
    if t == "json":
        return {"type": t, "keys": list(rng.choice(JSON_KEYS))}
    if t == "end_with":
        phrase = rng.choice(END_PHRASES)
        used.update(w.lower() for w in words(phrase))
        return {"type": t, "phrase": phrase}
    if t == "start_with":
        word = rng.choice(START_WORDS)
        used.add(word.lower())
        return {"type": t, "word": word}
    return {"type": t}


def _pick(rng: random.Random, topic_words: Sequence[str], n: int, budget: int | None = None) -> list[Constraint]:
    types: list[str] = []
    candidates = list(TYPE_WEIGHTS)
    while len(types) < n:
        ok = [t for t in candidates if t not in types and all(frozenset((t, u)) not in CONFLICTS for u in types)]
        if not ok:
            break
        types.append(rng.choices(ok, weights=[TYPE_WEIGHTS[t] for t in ok])[0])
    used: set[str] = set()
    # words that must appear are drawn first so that forbidden words never clash with them
    rank = {"include_words": 0, "end_with": 1, "start_with": 1, "forbid_words": 3}
    order = sorted(types, key=lambda t: rank.get(t, 2))
    made = {t: _params(t, rng, topic_words, used, budget) for t in order}
    return [made[t] for t in types]


def zipf_users(n_users: int, exponent: float = 0.8) -> tuple[list[str], list[float]]:
    """User ids ``u0000..`` and Zipf weights p(rank r) ∝ 1 / r^exponent."""
    ids = [f"u{i:04d}" for i in range(n_users)]
    w = [1.0 / (r + 1) ** exponent for r in range(n_users)]
    s = sum(w)
    return ids, [x / s for x in w]


def generate_tasks(n: int, seed: int = 0, n_users: int = 400, min_constraints: int = 2, max_constraints: int = 4,
                   id_prefix: str = "ct", max_words: int | None = None) -> list[ConstraintTask]:
    """``n`` seeded constraint-following prompts with 2-4 compatible constraints each.

    Every constraint set is checked feasible: :func:`repair` of an empty answer
    must satisfy it (otherwise the parameters are redrawn), so every prompt
    has a demonstration that passes the gold scorer. With ``max_words`` (the
    response budget in words, e.g. ~0.6 x max_new_tokens) that demonstration
    must also fit the budget: a task no answer of the allowed length can
    satisfy ("at least 60 words" in 64 tokens) teaches nothing.
    """
    if n < 0 or not 1 <= min_constraints <= max_constraints:
        raise ValueError("need n >= 0 and 1 <= min_constraints <= max_constraints")
    rng = random.Random(seed)
    users, weights = zipf_users(n_users)
    out = []
    for i in range(n):
        topic, topic_words = rng.choice(TOPICS)
        for _attempt in range(50):
            cons = _pick(rng, topic_words, rng.randint(min_constraints, max_constraints), max_words)
            try:
                answer = repair(cons, "", topic, max_words=max_words)
            except RepairError:
                continue
            if max_words is None or count_words(answer) <= max_words:
                break
        else:
            raise ValueError("could not draw a feasible constraint set in 50 tries"
                             + (f": max_words={max_words} is too small a budget" if max_words else ""))
        ask = rng.choice(TASK_PHRASES).format(t=topic)
        prompt = " ".join([ask] + [describe(c) for c in cons])
        uid = rng.choices(users, weights=weights)[0]
        out.append(ConstraintTask(f"{id_prefix}{seed}-{i:06d}", prompt, uid, topic, list(topic_words), cons))
    return out


def split_by_user(tasks: Sequence[ConstraintTask], heldout_frac: float = 0.2, seed: int = 0
                  ) -> tuple[list[ConstraintTask], list[ConstraintTask]]:
    """(train, held-out) with no user on both sides (InstructGPT §3.2)."""
    users = sorted({t.user_id for t in tasks})
    rng = random.Random(seed)
    rng.shuffle(users)
    held = set(users[: max(1, round(heldout_frac * len(users)))]) if users else set()
    return [t for t in tasks if t.user_id not in held], [t for t in tasks if t.user_id in held]


def save_tasks(path: str | Path, tasks: Sequence[ConstraintTask]) -> int:
    return write_jsonl(path, (t.to_row() for t in tasks))


def load_tasks(src) -> list[ConstraintTask]:
    """Load tasks written by :func:`save_tasks`; errors name file, line and field."""
    out, seen = [], {}
    for s, i, row in iter_rows(src):
        for key in ("id", "prompt", "constraints"):
            if key not in row:
                raise DataError(s, i, key, "missing")
        if not isinstance(row["id"], str) or not row["id"]:
            raise DataError(s, i, "id", "must be a non-empty string")
        if row["id"] in seen:
            raise DataError(s, i, "id", f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = i
        if not isinstance(row["prompt"], str) or is_blank(row["prompt"]):
            raise DataError(s, i, "prompt", "must be a non-empty string")
        cons = row["constraints"]
        if not isinstance(cons, list) or not cons:
            raise DataError(s, i, "constraints", "must be a non-empty list")
        for j, c in enumerate(cons):
            msg = validate_constraint(c)
            if msg:
                raise DataError(s, i, f"constraints[{j}]", msg)
        tw = row.get("topic_words", [])
        if not isinstance(tw, list) or not all(isinstance(w, str) for w in tw):
            raise DataError(s, i, "topic_words", "must be a list of strings")
        uid = row.get("user_id")
        out.append(ConstraintTask(row["id"], row["prompt"], "" if uid is None else str(uid), str(row.get("topic", "")),
                                  tw, cons))
    return out


# ---------------------------------------------------------------------------
# Simulated policy samples (for tests, calibration and offline benchmarks)
# ---------------------------------------------------------------------------


def sample_responses(task: ConstraintTask, k: int, rng: random.Random) -> list[str]:
    """``k`` distinct, varied responses of uneven compliance, as a policy might write.

    Each starts from a plain on-topic draft (3-7 filler sentences, shuffled)
    and is repaired against a random subset of the task's constraints (so it
    satisfies some and likely misses others); about one in eight is degenerate
    (truncated or looping). Used to calibrate labeler noise on realistic sets,
    not as training data.
    """
    out: list[str] = []
    filler = topic_filler(task.topic)
    tries = 0
    while len(out) < k and tries < 50 * k:
        tries += 1
        draft = rng.sample(filler, rng.randint(3, 7))
        text = " ".join(draft)
        roll = rng.random()
        if roll < 0.06:
            text = " ".join(draft[0].split()[: rng.randint(1, 4)])  # truncated
        elif roll < 0.12:
            text = " ".join([draft[0]] * rng.randint(3, 6))  # looping
        else:
            subset = [c for c in task.constraints if rng.random() < 0.55]
            try:
                text = repair(subset, text, task.topic) if subset else text
            except RepairError:
                pass
        if text.strip() and text not in out:
            out.append(text)
    return out


def demonstration_text(task: ConstraintTask, draft: str = "") -> str:
    """A response that passes every constraint: ``draft`` (e.g. a model sample) repaired."""
    text = repair(task.constraints, draft, task.topic)
    if not satisfies_all(task.constraints, text):  # repair() already raises; this guards future edits
        raise RepairError(f"demonstration for {task.id} fails its constraints")
    return text
