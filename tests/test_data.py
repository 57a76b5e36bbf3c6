"""Loaders: every bad row is a DataError naming file, line and field; writers round-trip."""

import json
import warnings
from pathlib import Path

import pytest

from instructrl.data import (
    Demonstration,
    PromptRecord,
    Ranking,
    Rating,
    demonstration_row,
    load_demonstrations,
    load_prompts,
    load_rankings,
    load_ratings,
    load_text_corpus,
    parse_hh_transcript,
    prompt_row,
    ranking_row,
    rating_row,
)
from instructrl.io import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
GOOD_RANKING = {"prompt": "Name a colour.", "responses": ["Red.", "Blue.", "Bananas."]}


def write_lines(path: Path, lines: list) -> Path:
    """Write rows (dicts become JSON, strings are written verbatim) one per line."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def expect_error(loader, tmp_path, bad, field, match, line=2, **kw):
    """Put ``bad`` on line 2 after a good row 1; the error must name file, line 2 and field."""
    good = {"demonstrations": {"prompt": "Hi", "response": "Hello"},
            "ratings": {"prompt": "Hi", "response": "Hello", "rating": 5},
            "prompts": {"id": "a", "prompt": "Hi"}}.get(loader.__name__.removeprefix("load_"), GOOD_RANKING)
    f = write_lines(tmp_path / "in.jsonl", [good, bad])
    with pytest.raises(DataError) as ei:
        loader(f, **kw)
    e = ei.value
    assert (e.source, e.line, e.field) == (str(f), line, field), str(e)
    assert str(e).startswith(f"{f}:{line}:")
    if field:
        assert f"field {field!r}" in str(e)
    assert match in str(e), str(e)
    return e


# --------------------------------------------------------------------------- malformed lines


@pytest.mark.parametrize("loader", [load_prompts, load_demonstrations, load_rankings, load_ratings])
def test_malformed_json_line_names_file_and_line(tmp_path, loader):
    expect_error(loader, tmp_path, '{"prompt": "Hi", ', None, "not valid JSON")


@pytest.mark.parametrize("loader", [load_prompts, load_demonstrations, load_rankings, load_ratings])
def test_non_object_line(tmp_path, loader):
    expect_error(loader, tmp_path, "[1, 2]", None, "expected a JSON object, got list")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_demonstrations(tmp_path / "nope.jsonl")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n\n   \n{"prompt": "a"}\n')
    with pytest.raises(DataError) as ei:
        load_demonstrations(f)
    assert ei.value.line == 4 and ei.value.field == "response"


# --------------------------------------------------------------------------- prompts and messages


def test_missing_prompt(tmp_path):
    expect_error(load_demonstrations, tmp_path, {"response": "x"}, "prompt", "missing")


def test_empty_prompt(tmp_path):
    expect_error(load_demonstrations, tmp_path, {"prompt": "  ", "response": "x"}, "prompt", "empty")


def test_empty_response(tmp_path):
    expect_error(load_demonstrations, tmp_path, {"prompt": "Hi", "response": " \n"}, "response", "empty")


def test_response_wrong_type(tmp_path):
    expect_error(load_demonstrations, tmp_path, {"prompt": "Hi", "response": 3}, "response", "must be a string")


def test_bad_message_role(tmp_path):
    bad = {"prompt": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "response": "x"}
    expect_error(load_demonstrations, tmp_path, bad, "prompt[1].role", "'robot'")


def test_message_without_content(tmp_path):
    expect_error(load_demonstrations, tmp_path, {"prompt": [{"role": "user"}], "response": "x"}, "prompt[0]",
                 "needs 'role' and 'content'")


def test_assistant_last_prompt(tmp_path):
    bad = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "response": "x"}
    expect_error(load_demonstrations, tmp_path, bad, "prompt", "must not be the assistant's")


def test_duplicate_prompt_id(tmp_path):
    e = expect_error(load_prompts, tmp_path, {"id": "a", "prompt": "Again"}, "id", "duplicate id 'a'")
    assert "first on line 1" in str(e)


def test_prompts_text_and_chat():
    recs = load_prompts(EXAMPLES / "prompts.jsonl")
    assert recs[0] == PromptRecord("p0", [{"role": "user", "content": "Write one short sentence about the ocean."}], "u0")
    chat = [r for r in recs if r.id == "p-chat"][0]
    assert [m["role"] for m in chat.messages] == ["system", "user"]


def test_rows_without_id_get_file_and_line(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert load_demonstrations(f)[0].id == "d.jsonl:1"


# --------------------------------------------------------------------------- rankings


def test_ranking_k_below_two(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "responses": ["only"]}, "responses", "K >= 2")


def test_ranking_empty_response(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "responses": ["a", " "]}, "responses[1]", "empty")


def test_ranking_duplicate_responses(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "responses": ["a", "b", "a"]}, "responses[2]",
                 "duplicate of responses[0]")


@pytest.mark.parametrize("ranking", [[0, 0, 1], [0, 1], [1, 2, 3], [0, 1, "2"], [0.0, 1.0, 2.0], [True, 0, 2], "012"])
def test_ranking_not_a_permutation(tmp_path, ranking):
    expect_error(load_rankings, tmp_path, {**GOOD_RANKING, "ranking": ranking}, "ranking", "permutation of 0..2")


@pytest.mark.parametrize("ties,field,match", [
    ([[0]], "ties[0]", "two or more distinct"),
    ([[0, 0]], "ties[0]", "two or more distinct"),
    ([[0, 3]], "ties[0]", "indices in 0..2"),
    ([[0, -1]], "ties[0]", "indices in 0..2"),
    ([[True, 1]], "ties[0]", "indices in 0..2"),
    ("0,1", "ties", "list of groups"),
    ([[0, 1], [1, 2]], "ties[1]", "already in ties[0]"),
    ([[0, 2]], "ties[0]", "neighbours in the ranking"),  # 1 sits between 0 and 2
])
def test_ranking_bad_ties(tmp_path, ties, field, match):
    expect_error(load_rankings, tmp_path, {**GOOD_RANKING, "ties": ties}, field, match)


def test_ranking_all_tied(tmp_path):
    expect_error(load_rankings, tmp_path, {**GOOD_RANKING, "ties": [[0, 1, 2]]}, "ties", "all responses are tied")


def test_ranking_order_ties_and_pairs():
    r1, r2 = load_rankings(EXAMPLES / "rankings.jsonl")
    assert r1.ranks == [0, 1, 2, 3] and r1.responses[0].startswith("Tea is")
    # r2: "ranking": [2, 1, 0, 3] best-first, "ties": [[0, 3]] (Purple. == Bananas.)
    assert r2.responses == ["Red is a primary colour.", "Blue.", "Purple.", "Bananas."]
    assert r2.ranks == [0, 1, 2, 2]
    assert sorted(r2.pairs()) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # no (2, 3): tied


def test_ranking_ties_follow_the_ranking_order(tmp_path):
    # Ties name response indices as given in the file, not positions in the ranking.
    row = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [3, 1, 0, 2], "ties": [[1, 0]]}
    (r,) = load_rankings(write_lines(tmp_path / "r.jsonl", [row]))
    assert r.responses[0] == "d" and set(r.responses[1:3]) == {"a", "b"} and r.responses[3] == "c"
    assert r.ranks == [0, 1, 1, 3]


def test_ranking_missing_responses(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "response": "x"}, "responses", "missing")


# --------------------------------------------------------------------------- pairwise layouts


def test_pairwise_three_layouts():
    c1, c2, c3 = load_rankings(EXAMPLES / "pairwise.jsonl")
    assert (c1.messages, c1.responses, c1.ranks) == ([{"role": "user", "content": "Say hello."}], ["Hello!", "Go away."], [0, 1])
    assert (c2.messages, c2.responses) == ([{"role": "user", "content": "Say hi."}], ["Hi there!", "No."])
    assert (c3.messages, c3.responses) == ([{"role": "user", "content": "What is 2+2?"}], ["4.", "5."])
    assert c1.pairs() == [(0, 1)]


def test_pairwise_mixed_types(tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": [{"role": "assistant", "content": "c"}]}
    expect_error(load_rankings, tmp_path, bad, "chosen", "both be strings or both message lists")


def test_pairwise_missing_rejected(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "chosen": "a"}, "rejected", "missing")


def test_pairwise_identical(tmp_path):
    expect_error(load_rankings, tmp_path, {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical")


def test_pairwise_empty_reply(tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: no"}
    expect_error(load_rankings, tmp_path, bad, "chosen", "response is empty")


def test_hh_transcripts_differing_before_last_turn(tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
           "rejected": "\n\nHuman: a\n\nAssistant: B\n\nHuman: c\n\nAssistant: e"}
    expect_error(load_rankings, tmp_path, bad, "rejected", "differ before the last Assistant turn")


def test_hh_transcript_not_a_transcript(tmp_path):
    expect_error(load_rankings, tmp_path, {"chosen": "just text", "rejected": "other"}, "chosen", "not an HH transcript")


def test_hh_transcript_ending_with_human(tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: x"}
    expect_error(load_rankings, tmp_path, bad, "chosen", "must end with an Assistant turn")


@pytest.mark.parametrize("chosen,field", [
    (["not a message"], "chosen"),  # used to crash with AttributeError
    ([{"role": "user", "content": "hi"}], "chosen"),
    ([], "chosen"),
])
def test_chat_pair_must_end_with_assistant(tmp_path, chosen, field):
    bad = {"chosen": chosen, "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    expect_error(load_rankings, tmp_path, bad, field, "ending with an assistant message")


def test_chat_pair_contexts_differ(tmp_path):
    bad = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "ho"}, {"role": "assistant", "content": "b"}]}
    expect_error(load_rankings, tmp_path, bad, "rejected", "differ before the last turn")


def test_hh_transcript_multi_turn_by_hand():
    text = ("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast.\n\n"
            "Human: How long?\n\nAssistant: About 40 minutes at 220C.")
    messages, reply = parse_hh_transcript(text)
    assert messages == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour, water, yeast."},
        {"role": "user", "content": "How long?"},
    ]
    assert reply == "About 40 minutes at 220C."


def test_real_hh_file_loads_with_few_skips(hh_file):
    skipped: list[DataError] = []
    with pytest.warns(UserWarning, match=r"skipped \d+ invalid rows"):
        rows = load_rankings(hh_file, errors="skip", skipped=skipped)
    total = len(rows) + len(skipped)
    assert total == sum(1 for line in __import__("gzip").open(hh_file, "rt") if line.strip())
    assert 0 < len(skipped) < 0.02 * total, f"{len(skipped)} of {total} rows skipped"
    assert all(e.source == str(hh_file) and e.line and e.field in ("chosen", "rejected") for e in skipped)
    assert all(r.k == 2 and r.messages[-1]["role"] == "user" for r in rows)


# --------------------------------------------------------------------------- errors="skip"


def test_skip_reports_every_bad_row(tmp_path):
    lines = [GOOD_RANKING, '{"broken', {"prompt": "p", "responses": ["a"]}, "[1]",
             {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]
    f = write_lines(tmp_path / "r.jsonl", lines)
    skipped: list[DataError] = []
    with pytest.warns(UserWarning, match="skipped 4 invalid rows"):
        rows = load_rankings(f, errors="skip", skipped=skipped)
    assert len(rows) == 2
    assert [e.line for e in skipped] == [2, 3, 4, 6]
    assert [e.field for e in skipped] == [None, "responses", None, "rejected"]
    with pytest.raises(DataError, match=":2:"):  # the default stops at the first one
        load_rankings(f)


def test_skip_warns_even_without_a_list(tmp_path):
    f = write_lines(tmp_path / "r.jsonl", [GOOD_RANKING, {"prompt": "p", "responses": ["a"]}])
    with pytest.warns(UserWarning, match="skipped 1 invalid rows; first: .*r.jsonl:2"):
        assert len(load_rankings(f, errors="skip")) == 1


def test_no_warning_when_nothing_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_rankings(EXAMPLES / "pairwise.jsonl", errors="skip")


def test_bad_errors_mode():
    with pytest.raises(ValueError, match="errors must be"):
        load_rankings([], errors="ignore")


# --------------------------------------------------------------------------- ratings


def test_ratings_example():
    t1, t2 = load_ratings(EXAMPLES / "ratings.jsonl")
    assert t1.rating == 6 and t1.flags == {"follows_explicit_constraints": True}
    assert t2.flags == {"expresses_opinion": True, "hallucination": False}


@pytest.mark.parametrize("rating", [0, 8, 3.5, "5", True, None])
def test_rating_out_of_range(tmp_path, rating):
    row = {"prompt": "p", "response": "r", "rating": rating}
    expect_error(load_ratings, tmp_path, row, "rating", "integer from 1 to 7")


def test_rating_unknown_flag(tmp_path):
    e = expect_error(load_ratings, tmp_path, {"prompt": "p", "response": "r", "rating": 3, "flags": {"rude": True}},
                     "flags.rude", "unknown flag")
    assert "hallucination" in str(e)  # lists the known flags


def test_rating_flag_not_bool(tmp_path):
    expect_error(load_ratings, tmp_path, {"prompt": "p", "response": "r", "rating": 3, "flags": {"hallucination": 1}},
                 "flags.hallucination", "true or false")


# --------------------------------------------------------------------------- other sources


def test_load_from_list_of_dicts():
    rows = [{"prompt": "Hi", "response": "Hello", "labeler_id": 7}]
    (d,) = load_demonstrations(rows)
    assert d.response == "Hello" and d.labeler_id == "7"
    with pytest.raises(DataError) as ei:
        load_demonstrations(rows + [{"prompt": "Hi"}])
    assert (ei.value.line, ei.value.field) == (2, "response") and str(ei.value).startswith("dataset list:2:")


def test_load_from_datasets_with_mixed_layouts():
    datasets = pytest.importorskip("datasets")
    # Mixed layouts in one table (as datasets reads a JSON file with mixed keys): every row has
    # every column, absent ones None, which must read as "absent".
    ds = datasets.Dataset.from_dict({
        "prompt": ["Name a colour.", "Say hi."],
        "responses": [["Red.", "Blue.", "Bananas."], None],
        "ranking": [[1, 0, 2], None],
        "chosen": [None, "Hi!"],
        "rejected": [None, "No."],
    })
    assert ds[1]["responses"] is None and ds[0]["chosen"] is None
    r1, r2 = load_rankings(ds)
    assert r1.responses == ["Blue.", "Red.", "Bananas."] and r2.responses == ["Hi!", "No."]
    bad = datasets.Dataset.from_list([{"prompt": "p", "response": "r", "rating": 9}])
    with pytest.raises(DataError, match=r"^dataset Dataset:1: field 'rating'"):
        load_ratings(bad)


def test_text_corpus(tmp_path):
    assert len(load_text_corpus(EXAMPLES / "pretrain.jsonl")) == 12
    f = write_lines(tmp_path / "t.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'text': missing"):
        load_text_corpus(f)


def test_example_files_all_load():
    assert len(load_demonstrations(EXAMPLES / "demonstrations.jsonl")) == 13


# --------------------------------------------------------------------------- writers round-trip


def test_writers_round_trip(tmp_path):
    from instructrl.io import write_jsonl

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = PromptRecord("p1", msgs, "u1")
    d = Demonstration("d1", msgs, "Hello", "u1", "L1")
    t = Rating("t1", msgs, "Hello", 4, {"hallucination": True}, "L2")
    for obj, row_fn, loader in ((p, prompt_row, load_prompts), (d, demonstration_row, load_demonstrations),
                                (t, rating_row, load_ratings)):
        write_jsonl(tmp_path / "x.jsonl", [row_fn(obj)])
        assert loader(tmp_path / "x.jsonl") == [obj]


def test_ranking_row_with_ties_round_trips(tmp_path):
    from instructrl.io import write_jsonl

    msgs = [{"role": "user", "content": "q"}]
    r = Ranking("r1", msgs, ["a", "b", "c", "d", "e"], [0, 1, 1, 3, 3], "L1", "u1")
    row = ranking_row(r)
    assert row["ties"] == [[1, 2], [3, 4]]
    write_jsonl(tmp_path / "r.jsonl", [row])
    (back,) = load_rankings(tmp_path / "r.jsonl")
    assert back == r


def test_ranking_row_sorts_an_unsorted_ranking(tmp_path):
    from instructrl.io import write_jsonl

    # Built worst-first: the file has no "ranking" key, so the writer must put the best first.
    r = Ranking("r1", [{"role": "user", "content": "q"}], ["worst", "mid", "best"], [2, 1, 0])
    write_jsonl(tmp_path / "r.jsonl", [ranking_row(r)])
    (back,) = load_rankings(tmp_path / "r.jsonl")
    assert back.responses == ["best", "mid", "worst"] and back.ranks == [0, 1, 2]
    assert {(r.responses[w], r.responses[l]) for w, l in r.pairs()} == \
        {(back.responses[w], back.responses[l]) for w, l in back.pairs()}
