"""The public IFEval format (Zhou et al. 2023, "Instruction-Following Evaluation
for Large Language Models"): loader, our own checkers, strict/loose accuracy.

Input rows (JSON Lines): ``{"key": int, "prompt": str, "instruction_id_list": [id, ...],
"kwargs": [{...}, ...]}`` - one kwargs dict per instruction id; ``null`` values
are ignored (the Hugging Face copy of the data lists every key with nulls).

The checkers follow the documented meaning of each instruction id in
google-research/instruction_following_eval (instructions.py); this is an
independent implementation. Known differences, all documented in docs/ifeval.md:
sentences are counted with our own splitter (reference: NLTK punkt), capital
words are found with a regex tokenizer (reference: NLTK word_tokenize), and the
language is detected with ``langdetect`` (a default dependency, seeded as the
reference does); only where it is missing, a small script + stop-word heuristic
decides (:func:`detect_language`).

Scoring (reference evaluation_lib.py): an empty response follows nothing;
prompt-level strict accuracy = share of prompts whose every instruction is
followed; instruction-level strict accuracy = share of all instructions
followed. Loose accuracy also accepts the response with its first and/or last
line removed and/or with ``*`` removed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from instructrl.data import Source, is_blank, iter_rows
from instructrl.io import DataError
from instructrl.core.stats import proportion_ci
from instructrl.tasks.text import count_sentences, count_words

RELATIONS = ("less than", "at least")

# ---------------------------------------------------------------------------
# Language detection
# ---------------------------------------------------------------------------

_STOPWORDS = {
    "en": "the and is are of to in that it for with on as was this be you not have they",
    "es": "el la los las de que y en un una es por para con no se del al lo como",
    "pt": "o a os as de que e em um uma é não do da para com se por dos das",
    "fr": "le la les de des et est un une que en du pour pas qui dans sur au ce",
    "de": "der die das und ist nicht ein eine zu den mit von sich auch auf für dem des",
    "it": "il la di che e è un una per non del della con sono gli le nel da si",
    "nl": "de het een en van is dat niet op te zijn met voor er aan ook als",
    "pl": "i w na nie się z że do to jest jak o co ale przez od po tak",
    "fi": "ja on ei se että hän oli ole mutta kun niin myös tai joka ovat sen",
    "sw": "na ya wa kwa ni katika za la cha kuwa hii au lakini pia sana watu",
    "id": "dan yang di ini itu dengan untuk dari tidak ada akan dalam ke juga",
    "tr": "ve bir bu da de için ile çok ama daha gibi olarak var ne o",
}
_STOP = {k: set(v.split()) for k, v in _STOPWORDS.items()}
_SCRIPTS = [  # (first, last, language) for scripts that identify one language here
    (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"), (0x0A80, 0x0AFF, "gu"), (0x0B80, 0x0BFF, "ta"),
    (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"), (0x0E00, 0x0E7F, "th"),
    (0x0590, 0x05FF, "he"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"), (0x3040, 0x30FF, "ja"),
]


def _heuristic_language(text: str) -> str | None:
    """ISO 639-1 code by writing system, then distinctive letters, then stop words; None if unsure."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    counts: Counter = Counter()
    for ch in letters:
        o = ord(ch)
        for lo, hi, lang in _SCRIPTS:
            if lo <= o <= hi:
                counts[lang] += 1
                break
        else:
            if 0x0600 <= o <= 0x06FF:
                counts["arabic"] += 1
            elif 0x0900 <= o <= 0x097F:
                counts["devanagari"] += 1
            elif 0x0400 <= o <= 0x04FF:
                counts["cyrillic"] += 1
            elif 0x4E00 <= o <= 0x9FFF:
                counts["han"] += 1
            elif o < 0x0250 or 0x1E00 <= o <= 0x1EFF:
                counts["latin"] += 1
    if not counts:
        return None
    script, _ = counts.most_common(1)[0]
    if counts.get("ja") and script in ("han", "ja"):
        return "ja"  # kana present: Japanese even when kanji dominate
    if script == "han":
        return "zh-cn"
    if script == "arabic":
        if re.search("[ٹڈڑںےھ]", text):
            return "ur"
        return "fa" if re.search("[پچژگکی]", text) else "ar"
    if script == "devanagari":
        toks = set(re.findall(r"[\u0900-\u097F]+", text))
        scores = {"hi": len(toks & {"है", "के", "और", "में", "की", "का", "हैं", "यह"}),
                  "mr": len(toks & {"आहे", "आणि", "आहेत", "हे", "या", "च्या", "करा"}),
                  "ne": len(toks & {"छ", "र", "मा", "पनि", "हुन्छ", "गर्न", "छन्"})}
        best = max(scores, key=scores.get)
        return best if scores[best] else "hi"
    if script == "cyrillic":
        if re.search("[ыэЫЭ]", text):
            return "ru"
        if re.search("[іїєґІЇЄҐ]", text):
            return "uk"
        return "bg" if re.search("[ъЪ]", text) else "ru"
    if script != "latin":
        return script
    low = text.lower()
    if len(re.findall("[ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]", low)) >= 3:
        return "vi"
    toks = re.findall(r"[^\W\d_]+", low)
    if not toks:
        return None
    scores = {lang: sum(t in sw for t in toks) for lang, sw in _STOP.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def detect_language(text: str) -> tuple[str | None, str]:
    """(ISO 639-1 code or None when undetermined, detector name).

    Uses ``langdetect`` (seeded, as the reference does: its sampling is random), a
    default dependency; the documented fallback where it is not installed is
    :func:`_heuristic_language`, which only tells apart the languages listed there
    (IFEval's response_language ids are mostly covered). langdetect sees the text in
    lower case: its n-gram profiles are of ordinary text, and on capitals (the
    change_case:english_capital check) it calls French English; the reference passes
    the text as it is.
    """
    try:
        import langdetect
    except ImportError:
        return _heuristic_language(text), "heuristic"
    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text.lower()), "langdetect"
    except langdetect.LangDetectException:
        return None, "langdetect"


def _lang_is(text: str, lang: str) -> bool:
    got, _ = detect_language(text)
    return got is None or got == lang  # undetectable text counts as followed (reference behaviour)


# ---------------------------------------------------------------------------
# Checkers: (response, kwargs) -> bool
# ---------------------------------------------------------------------------


def _relation(n_actual: int, n: int, relation: str) -> bool:
    return n_actual < n if relation == "less than" else n_actual >= n


def _count_ci(needle: str, text: str) -> int:
    return len(re.findall(re.escape(needle), text, flags=re.IGNORECASE))


def _nth_paragraph_first_word(r: str, kw: dict) -> bool:
    parts = r.split("\n\n")
    n = sum(1 for p in parts if p.strip())
    k = kw["nth_paragraph"]
    if k > n or k < 1 or not parts[k - 1].strip():
        return False
    word = parts[k - 1].strip().split()[0].lstrip("'\"")
    first = re.match(r"[^.,?!'\"]*", word).group().lower()
    return n == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _number_paragraphs(r: str, kw: dict) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if 0 < i < len(parts) - 1:
                return False  # an empty paragraph between dividers
            n -= 1
    return n == kw["num_paragraphs"]


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    low = r.lower()
    if marker == "P.P.S":
        pat = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pat = r"p\.\s?s\."
    else:
        pat = re.escape(marker.lower())
    return re.search(pat, low) is not None


def _highlights(r: str, kw: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _sections(r: str, kw: dict) -> bool:
    pieces = re.split(r"\s?" + re.escape(kw["section_spliter"].strip()) + r"\s?\d+\s?", r)
    return len(pieces) - 1 >= kw["num_sections"]


def _json_format(r: str, kw: dict) -> bool:
    v = r.strip()
    for pre in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(pre):
            v = v[len(pre):]
            break
    if v.endswith("```"):
        v = v[:-3]
    try:
        json.loads(v.strip())
    except ValueError:
        return False
    return True


def _two_responses(r: str, kw: dict) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if 0 < i < len(parts) - 1:
                return False
        else:
            valid.append(p.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def _capital_words(r: str, kw: dict) -> bool:
    toks = re.findall(r"\w+(?:-\w+)*", r)  # hyphenated words count as one
    n = sum(1 for t in toks if t.isupper())
    return _relation(n, kw["capital_frequency"], kw["capital_relation"])


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

CHECKERS: dict[str, Callable[[str, dict], bool]] = {
    "keywords:existence": lambda r, kw: all(_count_ci(k, r) > 0 for k in kw["keywords"]),
    "keywords:frequency": lambda r, kw: _relation(_count_ci(kw["keyword"].strip(), r), kw["frequency"], kw["relation"]),
    "keywords:forbidden_words": lambda r, kw: not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"]),
    "keywords:letter_frequency": lambda r, kw: _relation(
        r.lower().count(kw["letter"].strip().lower()), kw["let_frequency"], kw["let_relation"]),
    "language:response_language": lambda r, kw: _lang_is(r, kw["language"]),
    "length_constraints:number_sentences": lambda r, kw: _relation(count_sentences(r), kw["num_sentences"], kw["relation"]),
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": lambda r, kw: _relation(count_words(r), kw["num_words"], kw["relation"]),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda r, kw: len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"],
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda r, kw: (
        len(re.findall(r"^\s*\*[^*].*$", r, flags=re.MULTILINE)) + len(re.findall(r"^\s*-.*$", r, flags=re.MULTILINE))
    ) == kw["num_bullets"],
    "detectable_format:constrained_response": lambda r, kw: any(o in r.strip() for o in CONSTRAINED_OPTIONS),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": lambda r, kw: any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", r)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda r, kw: r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower()),
    "startend:end_checker": lambda r, kw: r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower()),
    "startend:quotation": lambda r, kw: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": lambda r, kw: r.isupper() and _lang_is(r, "en"),
    "change_case:english_lowercase": lambda r, kw: r.islower() and _lang_is(r, "en"),
    "punctuation:no_comma": lambda r, kw: "," not in r,
}

# Required kwargs per id: name -> type ("relation" = one of RELATIONS).
KWARGS: dict[str, dict[str, Any]] = {
    "keywords:existence": {"keywords": list},
    "keywords:frequency": {"keyword": str, "frequency": int, "relation": "relation"},
    "keywords:forbidden_words": {"forbidden_words": list},
    "keywords:letter_frequency": {"letter": str, "let_frequency": int, "let_relation": "relation"},
    "language:response_language": {"language": str},
    "length_constraints:number_sentences": {"num_sentences": int, "relation": "relation"},
    "length_constraints:number_paragraphs": {"num_paragraphs": int},
    "length_constraints:number_words": {"num_words": int, "relation": "relation"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": int, "nth_paragraph": int, "first_word": str},
    "detectable_content:number_placeholders": {"num_placeholders": int},
    "detectable_content:postscript": {"postscript_marker": str},
    "detectable_format:number_bullet_lists": {"num_bullets": int},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {"num_highlights": int},
    "detectable_format:multiple_sections": {"section_spliter": str, "num_sections": int},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {"prompt_to_repeat": str},
    "startend:end_checker": {"end_phrase": str},
    "startend:quotation": {},
    "change_case:capital_word_frequency": {"capital_frequency": int, "capital_relation": "relation"},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "punctuation:no_comma": {},
}
assert set(KWARGS) == set(CHECKERS)
INSTRUCTION_IDS = tuple(CHECKERS)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


@dataclass
class IFEvalRow:
    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]  # one per instruction, nulls removed


def _check_kwargs(iid: str, kw: Any, s: str, i: int, f: str) -> dict:
    if kw is None:
        kw = {}
    if not isinstance(kw, dict):
        raise DataError(s, i, f, f"must be an object of arguments for {iid}")
    kw = {k: v for k, v in kw.items() if v is not None}
    for name, typ in KWARGS[iid].items():
        if name not in kw:
            raise DataError(s, i, f"{f}.{name}", f"missing (required by {iid})")
        v = kw[name]
        if typ == "relation":
            if v not in RELATIONS:
                raise DataError(s, i, f"{f}.{name}", f"must be one of {list(RELATIONS)}, got {v!r}")
        elif typ is int:
            if isinstance(v, float) and v.is_integer():
                kw[name] = v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DataError(s, i, f"{f}.{name}", f"must be a non-negative integer, got {v!r}")
        elif typ is list:
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise DataError(s, i, f"{f}.{name}", "must be a list of non-empty strings")
        elif not isinstance(v, str) or not v.strip():
            raise DataError(s, i, f"{f}.{name}", f"must be a non-empty string, got {v!r}")
    return kw


def load_ifeval(src: Source) -> list[IFEvalRow]:
    """Read IFEval rows; the first bad row raises DataError naming file, line and field."""
    out, seen = [], {}
    for s, i, row in iter_rows(src):
        for k in ("key", "prompt", "instruction_id_list", "kwargs"):
            if k not in row:
                raise DataError(s, i, k, "missing")
        key = row["key"]
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise DataError(s, i, "key", f"must be an integer or string, got {type(key).__name__}")
        if key in seen:
            raise DataError(s, i, "key", f"duplicate key {key!r} (first on line {seen[key]})")
        seen[key] = i
        if not isinstance(row["prompt"], str) or is_blank(row["prompt"]):
            raise DataError(s, i, "prompt", "must be a non-empty string")
        ids, kws = row["instruction_id_list"], row["kwargs"]
        if not isinstance(ids, list) or not ids:
            raise DataError(s, i, "instruction_id_list", "must be a non-empty list of instruction ids")
        if not isinstance(kws, list) or len(kws) != len(ids):
            raise DataError(s, i, "kwargs", f"must be a list with one object per instruction ({len(ids)})")
        clean = []
        for j, (iid, kw) in enumerate(zip(ids, kws)):
            if iid not in CHECKERS:
                raise DataError(s, i, f"instruction_id_list[{j}]",
                                f"unknown instruction id {iid!r}; known: {', '.join(INSTRUCTION_IDS)}")
            clean.append(_check_kwargs(iid, kw, s, i, f"kwargs[{j}]"))
        out.append(IFEvalRow(key, row["prompt"], list(ids), clean))
    return out


def load_ifeval_responses(src: Source) -> dict[str, str]:
    """The reference response file: rows ``{"prompt", "response"}`` -> {prompt: response}."""
    out = {}
    for s, i, row in iter_rows(src):
        for k in ("prompt", "response"):
            if not isinstance(row.get(k), str):
                raise DataError(s, i, k, "missing or not a string")
        out[row["prompt"]] = row["response"]
    return out


# ---------------------------------------------------------------------------
# Checking and scoring
# ---------------------------------------------------------------------------


def check_instruction(instruction_id: str, kwargs: Mapping[str, Any], response: str) -> bool:
    """Strict verdict for one instruction; an empty response follows nothing."""
    if instruction_id not in CHECKERS:
        raise ValueError(f"unknown instruction id {instruction_id!r}")
    if not response.strip():
        return False
    return bool(CHECKERS[instruction_id](response, {k: v for k, v in kwargs.items() if v is not None}))


def loose_variants(response: str) -> list[str]:
    """The reference's loose variants: without first / last / both lines, each with and without '*'."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [b.replace("*", "") for b in base]


@dataclass
class IFEvalResult:
    key: int | str
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]


@dataclass
class IFEvalReport:
    prompt_strict: float
    instruction_strict: float
    prompt_loose: float
    instruction_loose: float
    n_prompts: int
    n_instructions: int
    ci: dict = field(default_factory=dict)  # metric -> (lo, hi), Wilson 95%
    per_instruction: dict = field(default_factory=dict)  # id -> {"n", "strict", "loose"}
    per_category: dict = field(default_factory=dict)  # "keywords" -> {"n", "strict", "loose"}
    language_detector: str = "heuristic"
    results: list[IFEvalResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "prompt_level_strict_accuracy": self.prompt_strict,
            "instruction_level_strict_accuracy": self.instruction_strict,
            "prompt_level_loose_accuracy": self.prompt_loose,
            "instruction_level_loose_accuracy": self.instruction_loose,
            "n_prompts": self.n_prompts, "n_instructions": self.n_instructions,
            "ci95": {k: list(v) for k, v in self.ci.items()},
            "per_instruction": self.per_instruction, "per_category": self.per_category,
            "language_detector": self.language_detector,
            "results": [{"key": r.key, "instruction_id_list": r.instruction_id_list, "strict": r.strict,
                         "loose": r.loose} for r in self.results],
        }


def evaluate_ifeval(rows: Sequence[IFEvalRow], responses: Sequence[str] | Mapping[str, str]) -> IFEvalReport:
    """Score responses against IFEval rows.

    ``responses``: a list aligned with ``rows``, or a mapping from prompt text
    (the reference response-file convention) or from key to response.
    """
    if isinstance(responses, Mapping):
        resp = []
        for r in rows:
            if r.prompt in responses:
                resp.append(responses[r.prompt])
            elif r.key in responses or str(r.key) in responses:
                resp.append(responses.get(r.key, responses.get(str(r.key))))
            else:
                raise KeyError(f"no response for IFEval key {r.key!r} (looked up by prompt and by key)")
    else:
        resp = list(responses)
        if len(resp) != len(rows):
            raise ValueError(f"{len(resp)} responses for {len(rows)} IFEval rows")
    results = []
    per: dict[str, list[int]] = {}
    for row, text in zip(rows, resp):
        if not isinstance(text, str):
            raise TypeError(f"response for key {row.key!r} must be a string, got {type(text).__name__}")
        variants = [v for v in loose_variants(text) if v.strip()]
        strict, loose = [], []
        for iid, kw in zip(row.instruction_id_list, row.kwargs):
            s = check_instruction(iid, kw, text)
            l = s or any(check_instruction(iid, kw, v) for v in variants)
            strict.append(s)
            loose.append(l)
            c = per.setdefault(iid, [0, 0, 0])
            c[0] += 1
            c[1] += s
            c[2] += l
        results.append(IFEvalResult(row.key, list(row.instruction_id_list), strict, loose))
    n_p = len(results)
    n_i = sum(len(r.strict) for r in results)
    counts = {
        "prompt_strict": (sum(all(r.strict) for r in results), n_p),
        "instruction_strict": (sum(sum(r.strict) for r in results), n_i),
        "prompt_loose": (sum(all(r.loose) for r in results), n_p),
        "instruction_loose": (sum(sum(r.loose) for r in results), n_i),
    }
    acc = {k: (a / n if n else float("nan")) for k, (a, n) in counts.items()}
    cats: dict[str, list[int]] = {}
    for iid, (n, s, l) in per.items():
        c = cats.setdefault(iid.split(":")[0], [0, 0, 0])
        c[0] += n
        c[1] += s
        c[2] += l
    fmt = lambda d: {k: {"n": n, "strict": s / n, "loose": l / n} for k, (n, s, l) in sorted(d.items())}
    return IFEvalReport(
        acc["prompt_strict"], acc["instruction_strict"], acc["prompt_loose"], acc["instruction_loose"], n_p, n_i,
        {k: proportion_ci(a, n) for k, (a, n) in counts.items()}, fmt(per), fmt(cats), detect_language("x")[1], results,
    )
