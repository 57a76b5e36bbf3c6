"""IFEval format: every instruction id with a passing and a failing response; loader errors; accuracies."""

import json
from pathlib import Path

import pytest

from instructrl.io import DataError
from instructrl.tasks.ifeval import (
    CHECKERS, INSTRUCTION_IDS, _heuristic_language, check_instruction, evaluate_ifeval, load_ifeval,
    load_ifeval_responses,
)

SAMPLE = Path(__file__).parent / "data" / "ifeval_sample.jsonl"

# The 25 ids of google-research instruction_following_eval/instructions_registry.py.
REFERENCE_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "startend:quotation", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma",
}

EN = "The weather today is mild and the park is full of people who are out for a walk."

# (id, kwargs, responses that follow it, responses that do not)
CASES = [
    ("keywords:existence", {"keywords": ["whisker", "Night"]}, ["At NIGHT my whiskers twitch."], ["At night I sleep."]),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     ["A cat sat.", "No felines here."], ["cat and cat", "Cat, CAT!"]),
    ("keywords:frequency", {"keyword": "tea", "frequency": 3, "relation": "at least"},
     ["tea tea Tea"], ["tea tea"]),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, ["A badge is fine."], ["That is BAD."]),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     ["Zig zag"], ["Zig"]),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"},
     ["A cab"], ["A banana"]),
    ("language:response_language", {"language": "fr"},
     ["Paris est une ville magnifique et les gens sont très accueillants dans le centre."], [EN]),
    ("language:response_language", {"language": "ru"}, ["Это очень красивый город, и люди здесь добрые."], [EN]),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     ["One here. Two here."], ["One. Two. Three."]),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     ["Dr. Who came. He left!"], ["Dr. Who came and left."]),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     ["First part.\n***\nSecond part.", "***\nA\n***\nB\n***"], ["A\n***\n***\nB", "A\n***\nB\n***\nC", "A\n\nB"]),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, ["one two three four"],
     ["one two three four five"]),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, ["don't stop"], ["two words"]),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "Summer"},
     ["Intro.\n\n\"Summer, at last.\"\n\nEnd."], ["Intro.\n\nWinter now.\n\nEnd.", "Intro.\n\nSummer.", "a\n\nsummer\n\nb\n\nc"]),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, ["Dear [name], at [address]."],
     ["Dear [name]."]),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, ["Bye.\nP.S. see you", "bye\np. s. later"],
     ["Bye. PS see you"]),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, ["Bye.\nP.P.S more"], ["Bye.\nP.S. more"]),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, ["Fruits:\n* apple\n- pear"],
     ["* apple\n* pear\n* fig", "**bold**\n* apple"]),
    ("detectable_format:constrained_response", {}, ["My answer is maybe."], ["Maybe."]),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, ["*one* and **two**"],
     ["*one* and ** **", "*one*"]),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     ["SECTION 1\nIntro\nSECTION 2\nBody"], ["SECTION 1\nIntro\nSection 2\nBody"]),
    ("detectable_format:json_format", {}, ['```json\n{"a": 1}\n```', "[1, 2]"], ["{a: 1}", "Here: {\"a\": 1}"]),
    ("detectable_format:title", {}, ["<<Poem of Joy>>\nLines"], ["<<  >> lines", "<<broken\ntitle>>"]),
    ("combination:two_responses", {}, ["First answer.\n******\nSecond answer."],
     ["Same.\n******\nSame.", "A\n******\n******\nB", "Only one."]),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about rain."},
     ["write a poem about rain. Drops fall."], ["Here is a poem about rain."]),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, ['Done. any other questions?"'],
     ["Any other questions? Bye."]),
    ("startend:quotation", {}, ['  "All quoted."  '], ['"Half quoted.', '"']),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     ["This is VERY IMPORTANT news."], ["This is VERY important news."]),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     ["Only ONE shout."], ["TWO WELL-KNOWN shouts."]),
    ("change_case:english_capital", {}, [EN.upper()], [EN, "C'EST UNE VILLE MAGNIFIQUE ET LES GENS SONT TRÈS GENTILS."]),
    ("change_case:english_lowercase", {}, [EN.lower()], [EN, "c'est une ville magnifique et les gens sont très gentils."]),
    ("punctuation:no_comma", {}, ["No commas at all."], ["Well, one comma."]),
]


def test_we_implement_exactly_the_reference_ids():
    assert set(INSTRUCTION_IDS) == REFERENCE_IDS == set(CHECKERS)
    assert {c[0] for c in CASES} == REFERENCE_IDS  # every id is exercised below


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_pass_and_fail(iid, kwargs, good, bad):
    for r in good:
        assert check_instruction(iid, kwargs, r), f"{iid} should accept {r!r}"
    for r in bad:
        assert not check_instruction(iid, kwargs, r), f"{iid} should reject {r!r}"
    assert not check_instruction(iid, kwargs, "   ")  # empty responses follow nothing (reference rule)


def test_heuristic_language_detector():
    assert _heuristic_language(EN) == "en"
    assert _heuristic_language("El perro de la casa es muy grande y los niños juegan con él.") == "es"
    assert _heuristic_language("Der Hund ist sehr groß und die Kinder spielen mit ihm auf der Straße.") == "de"
    assert _heuristic_language("東京は日本の首都です。とても大きい都市です。") == "ja"
    assert _heuristic_language("서울은 한국의 수도입니다.") == "ko"
    assert _heuristic_language("Це дуже гарне місто, і люди тут привітні.") == "uk"
    assert _heuristic_language("این یک شهر بسیار زیبا است و مردم آن مهربان هستند") == "fa"
    assert _heuristic_language("12345 !!!") is None


SAMPLE_RESPONSES = {
    # 1000: no comma (yes), 3 highlights (no: only 2), >= 30 words (yes)
    1000: "Raymond III was a *count of Tripoli* in the twelfth century and he ruled during a hard time for the "
          "crusader states. He is remembered for the **regency** he held and for his role before the battle of "
          "Hattin which ended badly for the kingdom and its army.",
    # 1001: keywords present, 'cat' once -> both followed
    1001: "I have a whisker and I hunt at night. What am I? A cat.",
    # 1002: title yes, quotation yes
    1002: '"<<Rain>>\nSoft drops fall on the roof."',
    # 1003: constrained response followed
    1003: "My answer is maybe.",
    # 1004: 3 bullets yes, ending no (strict); loose: dropping the last line fixes neither... ends with a period
    1004: "* apple\n* pear\n* fig\nIs there anything else I can help with?\nThanks.",
    # 1005: English, not French -> not followed
    1005: "Paris is the capital of France and it is known for its museums and the river that runs through it.",
    # 1006: lowercase english yes, postscript yes
    1006: "dear sam, i hope you are well and that the new job is going great.\np.s. call me soon.",
    # 1007: placeholders yes, sections yes
    1007: "SECTION 1\nDear [hiring manager],\nSECTION 2\nI am applying for [position].",
}


def test_sample_file_end_to_end():
    rows = load_ifeval(SAMPLE)
    assert len(rows) == 8 and {i for r in rows for i in r.instruction_id_list} <= REFERENCE_IDS
    assert rows[7].kwargs[0] == {"num_placeholders": 2}  # nulls (HF layout) are dropped
    rep = evaluate_ifeval(rows, [SAMPLE_RESPONSES[r.key] for r in rows])
    strict = {r.key: r.strict for r in rep.results}
    assert strict == {
        1000: [True, False, True], 1001: [True, True], 1002: [True, True], 1003: [True],
        1004: [True, False], 1005: [False], 1006: [True, True], 1007: [True, True],
    }
    assert rep.n_prompts == 8 and rep.n_instructions == 15
    assert rep.prompt_strict == pytest.approx(5 / 8)
    assert rep.instruction_strict == pytest.approx(12 / 15)
    # loose: removing the last line of 1004 makes it end with the phrase
    loose = {r.key: r.loose for r in rep.results}
    assert loose[1004] == [True, True] and loose[1000] == [True, False, True]
    assert rep.prompt_loose == pytest.approx(6 / 8) and rep.instruction_loose == pytest.approx(13 / 15)
    lo, hi = rep.ci["prompt_strict"]
    assert lo < 5 / 8 < hi
    d = rep.as_dict()
    json.dumps(d)
    assert d["per_category"]["keywords"] == {"n": 2, "strict": 1.0, "loose": 1.0}
    assert d["per_instruction"]["language:response_language"]["strict"] == 0.0
    # mapping by prompt (the reference response-file convention) gives the same numbers
    by_prompt = {r.prompt: SAMPLE_RESPONSES[r.key] for r in rows}
    assert evaluate_ifeval(rows, by_prompt).prompt_strict == rep.prompt_strict


def test_response_file_loader(tmp_path):
    p = tmp_path / "responses.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(DataError, match=r"responses.jsonl:2: field 'response'"):
        load_ifeval_responses(p)


BASE = {"key": 1, "prompt": "p", "instruction_id_list": ["keywords:frequency"],
        "kwargs": [{"keyword": "x", "frequency": 2, "relation": "at least"}]}


@pytest.mark.parametrize("patch,field,msg", [
    ({"instruction_id_list": ["keywords:shout"]}, "instruction_id_list[0]", "unknown instruction id"),
    ({"kwargs": []}, "kwargs", "one object per instruction"),
    ({"kwargs": [{"keyword": "x", "frequency": 2, "relation": "at most"}]}, "kwargs[0].relation", "must be one of"),
    ({"kwargs": [{"keyword": "x", "relation": "at least"}]}, "kwargs[0].frequency", "missing"),
    ({"kwargs": [{"keyword": "x", "frequency": "2", "relation": "at least"}]}, "kwargs[0].frequency", "integer"),
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"key": None}, "key", "integer or string"),
])
def test_loader_errors_name_file_line_field(tmp_path, patch, field, msg):
    p = tmp_path / "in.jsonl"
    bad = {**BASE, **patch}
    p.write_text(json.dumps({**BASE, "key": 0}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        load_ifeval(p)
    assert e.value.line == 2 and e.value.field == field and msg in str(e.value) and "in.jsonl" in str(e.value)


def test_duplicate_keys_and_missing_fields(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(BASE) + "\n" + json.dumps(BASE) + "\n")
    with pytest.raises(DataError, match="duplicate key"):
        load_ifeval(p)
    p.write_text(json.dumps({"key": 1, "prompt": "p", "kwargs": []}) + "\n")
    with pytest.raises(DataError, match="instruction_id_list"):
        load_ifeval(p)
