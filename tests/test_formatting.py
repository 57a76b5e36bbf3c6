"""The one tokenization rule: chat-template prompt + response + EOS; loss mask; truncation; padding."""

import pytest
import torch

from instructrl.formatting import (
    Example,
    TruncationStats,
    build_example,
    collate_examples,
    encode_prompt,
    encode_response,
    pad,
    truncate,
)
from instructrl.core.losses import sft_loss

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "write a short poem about the sea"}]


def test_sequence_is_template_prompt_plus_response_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = build_example(tok, CHAT, "the quick brown fox", max_length=512)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt (assistant header) ends the prompt
    want_p = tok(text, add_special_tokens=False)["input_ids"]
    want_r = tok("the quick brown fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == want_p + want_r
    assert ex.prompt_len == len(want_p) and ex.response_len == len(want_r)
    assert ex.input_ids[-1] == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert tok.decode(ex.input_ids[ex.prompt_len:]) == "the quick brown fox<|im_end|>"


def test_encode_pieces(tiny_tokenizer):
    tok = tiny_tokenizer
    assert encode_response(tok, "hello", add_eos=False) == tok("hello", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, CHAT)[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_no_chat_template_falls_back_to_plain_layout(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    ids = encode_prompt(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "User: hi\nAssistant:"


# --------------------------------------------------------------------------- loss mask


def test_loss_mask_covers_exactly_the_response_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    exs = [build_example(tok, CHAT, "the quick brown fox jumps", 512),
           build_example(tok, [{"role": "user", "content": "hi"}], "ok", 512)]
    b = collate_examples(exs, tok.pad_token_id)
    T = max(len(e.input_ids) for e in exs)
    assert b.input_ids.shape == b.attention_mask.shape == b.loss_mask.shape == (2, T)
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        want = torch.zeros(T)
        want[e.prompt_len:n] = 1  # response tokens and the EOS, nothing of prompt or padding
        assert torch.equal(b.loss_mask[i], want)
        assert b.loss_mask[i].sum() == e.response_len
        assert b.attention_mask[i].tolist() == [1] * n + [0] * (T - n)
        assert b.input_ids[i, n:].eq(tok.pad_token_id).all()


def test_loss_reaches_only_response_predictions(tiny_tokenizer):
    """Gradient flows only from logits that predict response tokens (positions prompt_len-1 .. n-2)."""
    tok = tiny_tokenizer
    exs = [build_example(tok, CHAT, "the sea", 512), build_example(tok, [{"role": "user", "content": "a"}], "b c", 512)]
    b = collate_examples(exs, tok.pad_token_id)
    logits = torch.randn(*b.input_ids.shape, len(tok), requires_grad=True)
    loss, st = sft_loss(logits, b.input_ids, b.loss_mask)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    for i, e in enumerate(exs):
        want = torch.zeros(b.input_ids.shape[1], dtype=torch.bool)
        want[e.prompt_len - 1: len(e.input_ids) - 1] = True
        assert torch.equal(touched[i], want)
    assert st["tokens"] == sum(e.response_len for e in exs)


def test_train_prompt_masks_only_padding_and_first_token(tiny_tokenizer):
    tok = tiny_tokenizer
    exs = [build_example(tok, CHAT, "x y", 512), build_example(tok, [{"role": "user", "content": "a"}], "b", 512)]
    b = collate_examples(exs, tok.pad_token_id, train_prompt=True)
    want = b.attention_mask.float().clone()
    want[:, 0] = 0  # nothing predicts the first token
    assert torch.equal(b.loss_mask, want)


# --------------------------------------------------------------------------- truncation

P = list(range(100, 130))  # 30 prompt ids
R = list(range(10))        # 10 response ids (last one stands for EOS)


def test_no_truncation_when_it_fits():
    st = TruncationStats()
    ex = truncate(P, R, 40, 16, st)
    assert ex == Example(P + R, 30)
    assert (st.examples, st.prompts_cut, st.responses_cut, st.tokens_dropped) == (1, 0, 0, 0)


def test_prompt_is_cut_from_the_left_first():
    st = TruncationStats()
    ex = truncate(P, R, 35, 16, st)
    assert ex.input_ids == P[5:] + R and ex.prompt_len == 25  # the latest turns (end of the prompt) are kept
    assert (st.prompts_cut, st.responses_cut, st.tokens_dropped) == (1, 0, 5)


def test_prompt_stops_at_min_then_response_cut_from_the_right():
    st = TruncationStats()
    ex = truncate(P, R, 20, 16, st)
    assert ex.input_ids == P[-16:] + R[:4] and ex.prompt_len == 16
    assert R[-1] not in ex.input_ids  # a cut response has no EOS
    assert (st.prompts_cut, st.responses_cut, st.tokens_dropped) == (1, 1, 14 + 6)


def test_short_prompt_is_never_cut():
    st = TruncationStats()
    ex = truncate(P[:10], R, 14, 16, st)
    assert ex.input_ids == P[:10] + R[:4]
    assert (st.prompts_cut, st.responses_cut, st.tokens_dropped) == (0, 1, 6)


def test_no_room_for_the_response_is_an_error():
    with pytest.raises(ValueError, match="leaves no room for the response"):
        truncate(P, R, 16, 16)


def test_stats_accumulate_and_summarise():
    st = TruncationStats()
    for m in (40, 35, 20):
        truncate(P, R, m, 16, st)
    assert (st.examples, st.prompts_cut, st.responses_cut, st.tokens_dropped) == (3, 2, 1, 25)
    assert st.summary() == "3 examples: 2 prompts cut from the left, 1 responses cut from the right, 25 tokens dropped"


def test_build_example_truncates_real_text(tiny_tokenizer):
    tok = tiny_tokenizer
    long_chat = [{"role": "user", "content": "the quick brown fox " * 30}]
    full = build_example(tok, long_chat, "hello world", 10_000)
    st = TruncationStats()
    ex = build_example(tok, long_chat, "hello world", 40, min_prompt_tokens=16, stats=st)
    assert len(ex.input_ids) == 40 and ex.response_len == full.response_len
    assert ex.input_ids == full.input_ids[-40:]  # the cut is on the left; the assistant header survives
    assert st.prompts_cut == 1 and st.tokens_dropped == len(full.input_ids) - 40


# --------------------------------------------------------------------------- padding


def test_pad_right_and_left():
    seqs = [[5, 6, 7], [8]]
    ids, mask = pad(seqs, 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad(seqs, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_uses_length_not_token_value():
    # The pad id may equal a real token (EOS as pad): the mask must come from lengths.
    ids, mask = pad([[2, 2], [2]], 2, "right")
    assert mask.tolist() == [[1, 1], [1, 0]]
