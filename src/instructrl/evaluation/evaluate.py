"""Evaluation: compare policies on held-out prompts, with honest statistics (InstructGPT §4, HH §2.3/§4.3).

``run_eval`` is the whole evaluation, top to bottom, one numbered phase each:

    1 prompts     held-out constraint tasks (prompts from held-out users), a seeded subset
    2 sample      every policy answers every prompt (KV cache, T = 1 like the paper, or greedy);
                  best-of-N samples N answers from the reference (SFT) and keeps the RM's favourite
    3 KL          Σ_t log π(y_t|·) − log π_ref(y_t|·) over the response tokens of the policy's own samples
    4 RM scores   the reward model scores every answer (tokenization rule of :mod:`instructrl.formatting`)
    5 gold        constraint satisfaction and gold score of every answer (:mod:`instructrl.tasks`)
    6 judge       held-out simulated labelers compare every pair of policies on every prompt;
                  the RM compares the same pairs by score
    7 statistics  win rates vs the baseline with Wilson 95% CIs (ties count half), Bradley-Terry/Elo
                  with bootstrap CIs, means with 95% CIs
    8 PPO curves  reward vs √KL per PPO step with a least-squares line (HH paper §4.3, Fig. 13)
    9 tax         mean per-token log-likelihood on held-out pretraining text (InstructGPT §4.2 "alignment tax")
   10 report      report.json + report.html (+ PNGs) + responses.jsonl, each written atomically

The simulated labelers are a programmatic stand-in for humans (docs/simulated-labelers.md).
Each phase is a function of its own below; the statistics are :mod:`.metrics`, the model
forwards :mod:`.sampling`, the report :mod:`.report` (``write_report`` is public so the pipeline
can add its own sections), the figures :mod:`instructrl.plots`. ``instructrl eval ifeval`` is
:mod:`.ifeval`. See docs/evaluation.md.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from instructrl.config import ConfigError, check, param
from instructrl.engines import EngineSettings, resolve_engine
from instructrl.evaluation.metrics import (best_of_n_kl, best_of_n_pick, gold_gain, labeler_outcome, loglik_bootstrap,
                                           mean_ci, outcomes_win_rate, reward_vs_sqrt_kl, rm_gold_agreement,
                                           score_outcomes, seed_for)
from instructrl.evaluation.report import ReportSection, format_summary, write_report
from instructrl.evaluation.sampling import Samples, encode_prompts, generate, rm_scores, text_logliks
from instructrl.runtime import Precision, Runtime, device_field, make_runtime, precision_field, set_threads
from instructrl.tasks.labelers import DEFAULT_NOISE

# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@dataclass
class EvalLabelers:
    n_train: int = param(6, "training labelers in the pool (they never judge evaluations)", min=1)
    n_heldout: int = param(3, "held-out labelers: the only ones that judge here (InstructGPT §4)", min=1)
    noise: float = param(DEFAULT_NOISE, "labeler noise (gold-score units); the default is calibrated to InstructGPT's "
                                             "inter-labeler agreement (72.6%; docs/simulated-labelers.md)", min=0)
    noise_kind: Literal["gaussian", "gumbel"] = param("gaussian", "labeler noise model (Thurstone or Plackett-Luce)")

    def validate(self):
        check(self.n_heldout >= 1, "labelers.n_heldout must be >= 1 (evaluation is judged by held-out labelers)")
        check(self.n_train >= 1, "labelers.n_train must be >= 1")
        check(self.noise >= 0, "labelers.noise must be >= 0")


@dataclass
class EvalConfig:
    policies: dict[str, str] = param(factory=dict, help="name -> model folder ('default' = embedded base), e.g. "
                                                         "{base: default, sft: runs/sft/model, ppo: runs/ppo/policy}")
    baseline: str = param("sft", "the policy every win rate is measured against (InstructGPT: the SFT model)")
    reference: str = param("", "reference policy for KL and best-of-N (the SFT folder); empty = policies[baseline]")
    tasks: str = param("", "held-out constraint tasks JSONL (tasks.save_tasks; prompts from held-out users); required")
    reward_model: str = param("", "reward model folder; required (RM-judged win rates, best-of-N)")
    rm_eos: bool = param(True, "the RM scores an answer cut off at max_new_tokens with EOS appended, as PPO's "
                               "rollout.rm_eos does (false = at its last token, as rollout.rm_eos=false)")
    best_of_n: int = param(0, "N > 0 adds the policy 'best-of-N': N samples from the reference, the RM's favourite kept", min=0)
    n_prompts: int = param(200, "prompts evaluated (a seeded subset of `tasks`); 0 = all", min=0)
    max_new_tokens: int = param(128, "response length limit", min=1)
    max_prompt_tokens: int = param(256, "prompts longer than this are cut from the left", min=1)
    temperature: float = param(1.0, "sampling temperature (InstructGPT samples at T = 1)", min=0, min_exclusive=True)
    greedy: bool = param(False, "greedy decoding instead of sampling (then 'KL' is the log-ratio on the greedy answer)")
    batch_size: int = param(64, "prompts per generation batch (decoding reads every weight once a token, so bigger batches cost little more; docs/evaluation.md)", min=1)
    micro_batch_size: int = param(8, "sequences per forward pass when scoring (KL, RM, pretraining text)", min=1)
    seed: int = param(0, "seed for the prompt subset, sampling, labeler noise and bootstrap", min=0, max=2**32 - 1)
    labeler_seed: int = param(0, "seed of LabelerPool.default: the pipeline's data seed, so the held-out labelers "
                                 "are the same simulated people as in training's pool", min=0, max=2**32 - 1)
    labelers: EvalLabelers = param(EvalLabelers(), "the rest of the simulated labeler pool (held-out labelers judge)")
    bootstrap: int = param(1000, "bootstrap resamples for the Elo and alignment-tax intervals", min=100)
    ppo_runs: dict[str, str] = param(factory=dict, help="name -> PPO run folder (metrics.jsonl) for reward vs √KL curves")
    pretrain_eval: str = param("", "held-out plain-text JSONL ({text}) for the alignment tax; empty = skip")
    pretrain_max_texts: int = param(200, "at most this many pretraining texts (the first ones)", min=1)
    pretrain_max_tokens: int = param(256, "each pretraining text is cut to this many tokens", min=2)
    output_dir: str = param("runs/eval", "report.html, report.json, PNGs, responses.jsonl go here")
    device: str = device_field()
    precision: Precision = precision_field()
    threads: int = param(0, "torch CPU threads; 0 = torch's default", min=0)
    examples: int = param(3, "prompts shown with every policy's answer in the report", min=0)
    engine: EngineSettings = param(EngineSettings(), "the sampler of every policy's answers and best-of-N: "
                                                     "engine.name=hf (built-in) or vllm (docs/vllm.md)")

    def validate(self):
        check(bool(self.policies), "policies: give at least one policy, e.g. policies.sft=runs/sft/model")
        for name, path in self.policies.items():
            check(isinstance(name, str) and bool(name.strip()), "policies: names must be non-empty strings")
            check(isinstance(path, str) and bool(path), f"policies.{name}: must be a model folder (or 'default')")
            check(not name.startswith("best-of-"), f"policies.{name}: names 'best-of-*' are reserved for best_of_n")
        check(self.baseline in self.policies,
              f"baseline {self.baseline!r} is not among the policies ({', '.join(self.policies)})")
        check(bool(self.tasks), "tasks: a held-out tasks JSONL is required (tasks=PATH)")
        check(bool(self.reward_model), "reward_model: a reward model folder is required (reward_model=PATH)")
        check(self.best_of_n >= 0, "best_of_n must be >= 0")
        check(not (self.best_of_n > 1 and self.greedy), "best_of_n needs sampling: set greedy=false")
        check(self.n_prompts >= 0, "n_prompts must be >= 0 (0 = all)")
        check(self.max_new_tokens >= 1 and self.max_prompt_tokens >= 1, "max_new_tokens/max_prompt_tokens must be >= 1")
        check(self.temperature > 0, "temperature must be > 0 (use greedy=true for greedy decoding)")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size/micro_batch_size must be >= 1")
        check(self.bootstrap >= 100, "bootstrap must be >= 100")
        check(self.pretrain_max_texts >= 1 and self.pretrain_max_tokens >= 2,
              "pretrain_max_texts must be >= 1 and pretrain_max_tokens >= 2")
        for name, path in self.ppo_runs.items():
            check(isinstance(path, str) and bool(path), f"ppo_runs.{name}: must be a PPO run folder")

    @property
    def reference_path(self) -> str:
        return self.reference or self.policies[self.baseline]


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _same_folder(a: str, b: str) -> bool:
    from instructrl.models import resolve_model

    try:
        return Path(resolve_model(a)).resolve() == Path(resolve_model(b)).resolve()
    except Exception:  # a hub id: compare as given
        return a == b


def _read_ppo_metrics(folder: str) -> list[dict]:
    from instructrl.io import DataError, read_jsonl

    p = Path(folder) / "metrics.jsonl"
    if not p.exists():
        raise DataError(str(p), None, None, "PPO run has no metrics.jsonl (is this a PPO run folder?)")
    return [row for _, row in read_jsonl(p)]


def check_inputs(cfg: EvalConfig) -> dict[str, list[dict]]:
    """Fail in seconds, not after an hour of sampling: every model folder, the RM, the PPO runs' metrics.

    Returns the PPO runs' metrics rows (name -> rows).
    """
    from instructrl.models import resolve_model

    for name, path in {**{f"policies.{k}": v for k, v in cfg.policies.items()}, "reference": cfg.reference_path,
                       "reward_model": cfg.reward_model}.items():
        try:
            resolve_model(path)
        except Exception as e:  # ModelLoadError: not a model folder
            raise ConfigError(f"{name}: {e}") from None
    if cfg.pretrain_eval and not Path(cfg.pretrain_eval).exists():
        raise ConfigError(f"pretrain_eval: {cfg.pretrain_eval} does not exist")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():  # else found only when the report is written, after the sampling
        raise ConfigError(f"output_dir: {out} exists and is not a folder; choose an output folder path")
    return {name: _read_ppo_metrics(path) for name, path in cfg.ppo_runs.items()}


def _frozen(model, rt: Runtime):
    """An evaluated model: eval mode, no gradients, on the command's device."""
    return model.eval().requires_grad_(False).to(rt.device)


@dataclass
class Prompts:
    """Phase 1: the held-out tasks evaluated (a seeded subset) and their chat messages, in the same order."""

    tasks: list
    messages: list[list[dict]]


def load_prompts(cfg: EvalConfig) -> Prompts:
    """The held-out tasks (``cfg.tasks``), a seeded subset of ``cfg.n_prompts`` kept in file order."""
    from instructrl.tasks import load_tasks

    tasks = load_tasks(cfg.tasks)
    if not tasks:
        raise ConfigError(f"tasks: {cfg.tasks} has no tasks")
    if cfg.n_prompts and cfg.n_prompts < len(tasks):
        keep = sorted(random.Random(cfg.seed).sample(range(len(tasks)), cfg.n_prompts))
        tasks = [tasks[i] for i in keep]
    return Prompts(tasks, [[{"role": "user", "content": t.prompt}] for t in tasks])


@dataclass
class Answers:
    """Phase 2: every policy's answers (best-of-N included), where each came from, and a note per policy."""

    samples: dict[str, Samples] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    best_of_n: str | None = None  # the best-of-N policy's name, if any

    @property
    def names(self) -> list[str]:
        return list(self.samples)


def _gen_kw(cfg: EvalConfig, rt: Runtime) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, greedy=cfg.greedy,
                batch_size=cfg.batch_size, rt=rt, micro_batch_size=cfg.micro_batch_size, engine=cfg.engine)


def sample_policies(cfg: EvalConfig, messages: list[list[dict]], ref, ref_tok, rt: Runtime) -> Answers:
    """Every policy answers every prompt, with each answer's KL to ``ref`` (none where the tokenizers differ)."""
    from instructrl.models import load_causal_lm, load_tokenizer

    ans = Answers()
    ref_vocab = ref_tok.get_vocab()
    for name, path in cfg.policies.items():
        tok = load_tokenizer(path)
        is_ref = _same_folder(path, cfg.reference_path)
        model = ref if is_ref else _frozen(load_causal_lm(path), rt)
        same_vocab = tok.get_vocab() == ref_vocab
        if not same_vocab:
            ans.notes[name] = "tokenizer differs from the reference: no KL"
        ans.samples[name] = generate(model, tok, encode_prompts(tok, messages, cfg.max_prompt_tokens),
                                     seed=seed_for(cfg.seed, name), ref=ref if same_vocab else None,
                                     desc=f"eval {name}", **_gen_kw(cfg, rt))
        ans.sources[name] = path
        if not is_ref:
            del model
    return ans


def sample_best_of_n(cfg: EvalConfig, messages: list[list[dict]], ref, ref_tok, rm, rm_tok, rt: Runtime,
                     ans: Answers) -> None:
    """Adds the policy 'best-of-N' to ``ans``: N samples of the reference per prompt, the RM's favourite kept."""
    N = cfg.best_of_n
    name = ans.best_of_n = f"best-of-{N}"
    rep = [m for m in messages for _ in range(N)]
    s = generate(ref, ref_tok, encode_prompts(ref_tok, rep, cfg.max_prompt_tokens),
                 seed=seed_for(cfg.seed, name), desc=f"eval {name} (sampling {N}x)", **_gen_kw(cfg, rt))
    sc = rm_scores(rm, rm_tok, rep, s.texts, s.ended, cfg.max_prompt_tokens, cfg.micro_batch_size, rt,
                   desc=f"RM {name}", rm_eos=cfg.rm_eos)
    ans.samples[name] = s.pick(best_of_n_pick(sc, N), [best_of_n_kl(N)] * len(messages))
    ans.sources[name] = f"{N} samples from {cfg.reference_path}, RM's favourite kept"
    ans.notes[name] = f"KL is the closed form log N − (N−1)/N = {best_of_n_kl(N):.3f} nats"


@dataclass
class Scores:
    """Phases 4-5: per policy, per prompt: RM score, gold score, all constraints met."""

    rm: dict[str, list[float]]
    gold: dict[str, list[float]]
    gold_ok: dict[str, list[bool]]


def gold_scores(tasks: list, ans: Answers) -> tuple[dict[str, list[float]], dict[str, list[bool]]]:
    """The rule-based gold scorer on every answer: (gold score, all constraints met) per policy."""
    from instructrl.tasks import gold_score, satisfies_all

    ok = {n: [satisfies_all(t.constraints, x) for t, x in zip(tasks, ans.samples[n].texts)] for n in ans.names}
    gold = {n: [gold_score(t.constraints, x, t.topic_words) for t, x in zip(tasks, ans.samples[n].texts)]
            for n in ans.names}
    return gold, ok


@dataclass
class Judgments:
    """Phase 6: every pairwise labeler comparison (a, b, outcome) and the pairwise labeler win-rate matrix."""

    comparisons: list[tuple[str, str, float]]
    pairwise: dict[str, dict[str, float]]


def judge_pairs(cfg: EvalConfig, tasks: list, pool, ans: Answers) -> Judgments:
    """Held-out labelers compare every pair of policies on every prompt (Bradley-Terry's input)."""
    names = ans.names
    comparisons = []
    pair_lab: dict[str, dict[str, float]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            outs = [labeler_outcome(pool, t, a, b, xa, xb, cfg.seed)
                    for t, xa, xb in zip(tasks, ans.samples[a].texts, ans.samples[b].texts)]
            comparisons += [(a, b, o) for o in outs]
            pair_lab[a][b] = float(np.mean(outs))
            pair_lab[b][a] = 1.0 - pair_lab[a][b]
    return Judgments(comparisons, pair_lab)


def policy_summaries(cfg: EvalConfig, tasks: list, pool, ans: Answers, sc: Scores) -> dict[str, dict]:
    """Per policy: win rates vs the baseline (labelers, RM), gold satisfaction and gain, RM score, KL, length."""
    from instructrl.core.stats import proportion_ci

    base = cfg.baseline
    out: dict[str, dict] = {}
    for n in ans.names:
        s, b = ans.samples[n], ans.samples[base]
        lab = [labeler_outcome(pool, t, n, base, xa, xb, cfg.seed) if n != base else 0.5
               for t, xa, xb in zip(tasks, s.texts, b.texts)]
        rmo = score_outcomes(sc.rm[n], sc.rm[base], s.texts, b.texts)
        sat = sum(sc.gold_ok[n])
        lo, hi = proportion_ci(sat, len(tasks))
        wl, wr = outcomes_win_rate(lab), outcomes_win_rate(rmo)
        out[n] = {
            "source": ans.sources[n],
            "win_rate_labelers": wl,
            "win_rate_rm": wr,
            "rm_minus_labeler": wr["rate"] - wl["rate"],
            "gold_satisfaction": {"rate": sat / len(tasks), "lo": lo, "hi": hi, "n": len(tasks)},
            "gold_score": mean_ci(sc.gold[n]),
            "gold_gain": gold_gain(sc.gold[n], sc.gold[base]),
            "rm_score": mean_ci(sc.rm[n]),
            "kl": mean_ci(s.kl) if s.kl is not None else None,
            "length_tokens": mean_ci(s.tokens),
            "length_words": mean_ci([len(x.split()) for x in s.texts]),
            "missing_eos": 1.0 - sum(s.ended) / len(s.ended),
            "note": ans.notes.get(n, ""),
        }
    return out


def elo_ratings(cfg: EvalConfig, names: list[str], judged: Judgments) -> dict[str, dict] | None:
    """Bradley-Terry/Elo with bootstrap CIs from every pairwise labeler comparison; None for one policy."""
    from instructrl.core.stats import bootstrap_ratings

    if len(names) < 2:
        return None
    ratings = bootstrap_ratings(judged.comparisons, n_boot=cfg.bootstrap, seed=cfg.seed, players=names,
                                baseline=cfg.baseline)
    return {n: r.as_dict() for n, r in ratings.items()}


def alignment_tax(cfg: EvalConfig, best_of_n: str | None, rt: Runtime) -> dict | None:
    """Mean per-token log-likelihood of held-out pretraining text per policy, paired bootstrap vs the baseline."""
    from instructrl.data import load_text_corpus
    from instructrl.models import load_causal_lm, load_tokenizer

    if not cfg.pretrain_eval:
        return None
    texts = load_text_corpus(cfg.pretrain_eval)[: cfg.pretrain_max_texts]
    sums, counts = {}, {}
    for n, path in cfg.policies.items():
        model = _frozen(load_causal_lm(path), rt)
        sums[n], counts[n] = text_logliks(model, load_tokenizer(path), texts, cfg.pretrain_max_tokens,
                                          cfg.micro_batch_size, rt)
        del model
    keep = [i for i in range(len(texts)) if all(counts[n][i] > 0 for n in sums)]
    if not keep:
        raise ConfigError(f"pretrain_eval: {cfg.pretrain_eval} has no text of 2 or more tokens")
    tax = {"data": cfg.pretrain_eval, "n_texts": len(keep), "max_tokens": cfg.pretrain_max_tokens,
           "baseline": cfg.baseline,
           "policies": loglik_bootstrap({n: [sums[n][i] for i in keep] for n in sums},
                                        {n: [counts[n][i] for i in keep] for n in sums},
                                        cfg.baseline, cfg.bootstrap, seed=cfg.seed)}
    if best_of_n:
        tax["note"] = f"{best_of_n} samples from the reference model: its likelihood is the reference's"
    return tax


def example_answers(cfg: EvalConfig, tasks: list, ans: Answers, sc: Scores) -> list[dict]:
    """The first ``cfg.examples`` prompts with every policy's answer, for the report."""
    return [{"id": tasks[i].id, "prompt": tasks[i].prompt, "answers": {
        n: {"text": ans.samples[n].texts[i], "gold_ok": sc.gold_ok[n][i], "gold": sc.gold[n][i], "rm": sc.rm[n][i]}
        for n in ans.names}} for i in range(min(cfg.examples, len(tasks)))]


def write_responses(path: Path, tasks: list, ans: Answers, sc: Scores) -> None:
    """responses.jsonl: every answer of every policy with its scores (atomic)."""
    from instructrl.io import write_jsonl

    write_jsonl(path, (
        {"id": t.id, "user_id": t.user_id, "policy": n, "response": s.texts[i], "ended": s.ended[i],
         "tokens": s.tokens[i], "rm_score": sc.rm[n][i], "gold_score": sc.gold[n][i],
         "satisfies_all": sc.gold_ok[n][i], "kl": None if s.kl is None else s.kl[i]}
        for n, s in ans.samples.items() for i, t in enumerate(tasks)))


# ---------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------


def run_eval(cfg: EvalConfig, extra_sections: Sequence[ReportSection | dict | tuple] = ()) -> dict:
    """``instructrl eval``: every metric of every policy on the same held-out prompts; writes the report.

    ``extra_sections`` go to :func:`write_report` (the pipeline's rounds and stage timings).
    Returns the results dict that report.json holds.
    """
    from instructrl.config import config_to_dict
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.reward_model import load_reward_model
    from instructrl.tasks.labelers import LabelerPool

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rt = make_runtime(cfg.device, cfg.precision)
    cfg.precision = rt.precision  # saved resolved, so report.json says what ran
    cfg.engine, engine_why = resolve_engine(cfg.engine)  # auto -> vllm or hf here, saved resolved too
    print(f"[eval] {engine_why}")
    out_dir = Path(cfg.output_dir)

    # ---- 1. prompts: a seeded subset of the held-out tasks ----
    ppo_metrics = check_inputs(cfg)
    prompts = load_prompts(cfg)
    tasks, messages = prompts.tasks, prompts.messages
    pool = LabelerPool.default(cfg.labelers.n_train, cfg.labelers.n_heldout, cfg.labeler_seed, cfg.labelers.noise,
                               cfg.labelers.noise_kind)
    print(f"[eval] {len(tasks)} held-out prompts, {len(cfg.policies)} policies"
          + (f" + best-of-{cfg.best_of_n}" if cfg.best_of_n else "") + f", judged by {len(pool.heldout)} held-out "
          f"simulated labelers and the RM")

    # ---- 2-3. sample every policy (with its KL to the reference), then best-of-N from the reference ----
    t0 = time.perf_counter()
    ref = _frozen(load_causal_lm(cfg.reference_path), rt)
    ref_tok = load_tokenizer(cfg.reference_path)
    ans = sample_policies(cfg, messages, ref, ref_tok, rt)
    timings["sample_policies"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm = _frozen(load_reward_model(cfg.reward_model), rt)
    rm_tok = load_tokenizer(cfg.reward_model)
    if cfg.best_of_n:
        sample_best_of_n(cfg, messages, ref, ref_tok, rm, rm_tok, rt, ans)
    del ref
    timings["best_of_n"] = time.perf_counter() - t0

    # ---- 4. RM scores; 5. gold scorer ----
    t0 = time.perf_counter()
    rm_sc = {n: rm_scores(rm, rm_tok, messages, s.texts, s.ended, cfg.max_prompt_tokens, cfg.micro_batch_size, rt,
                          desc=f"RM {n}", rm_eos=cfg.rm_eos) for n, s in ans.samples.items()}
    del rm
    timings["rm_scores"] = time.perf_counter() - t0
    sc = Scores(rm_sc, *gold_scores(tasks, ans))

    # ---- 6. judgments: held-out labelers on every pair of policies, RM on the same pairs ----
    t0 = time.perf_counter()
    judged = judge_pairs(cfg, tasks, pool, ans)
    per_policy = policy_summaries(cfg, tasks, pool, ans, sc)
    timings["judge"] = time.perf_counter() - t0

    # ---- 7. Bradley-Terry / Elo from every pairwise labeler comparison ----
    elo = elo_ratings(cfg, ans.names, judged)
    if elo:
        for n in ans.names:
            per_policy[n]["elo"] = elo[n]

    # ---- 8. reward vs √KL during PPO ----
    curves = {name: reward_vs_sqrt_kl(rows) | {"run": cfg.ppo_runs[name]} for name, rows in ppo_metrics.items()}

    # ---- 9. alignment tax: log-likelihood of held-out pretraining text ----
    t0 = time.perf_counter()
    tax = alignment_tax(cfg, ans.best_of_n, rt)
    timings["alignment_tax"] = time.perf_counter() - t0

    # ---- 10. report ----
    examples = example_answers(cfg, tasks, ans, sc)
    timings["total"] = time.perf_counter() - t_start
    results: dict[str, Any] = {
        "config": config_to_dict(cfg),
        "n_prompts": len(tasks),
        "baseline": cfg.baseline,
        "reference": cfg.reference_path,
        "decoding": "greedy" if cfg.greedy else f"sampling, T = {cfg.temperature}",
        "labelers": {"held_out": [l.id for l in pool.heldout], "pool_seed": cfg.labeler_seed,
                     "note": "simulated labelers: a programmatic stand-in for humans (docs/simulated-labelers.md)"},
        "policies": per_policy,
        "pairwise_labelers": judged.pairwise,
        "rm_gold_agreement": rm_gold_agreement(sc.rm, sc.gold, {n: s.texts for n, s in ans.samples.items()}),
        "elo": elo,
        "reward_vs_sqrt_kl": curves,
        "alignment_tax": tax,
        "examples": examples,
        "timings": timings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_responses(out_dir / "responses.jsonl", tasks, ans, sc)
    results = write_report(results, out_dir, extra_sections)["results"]
    print(format_summary(results))
    print(f"[eval] wrote {out_dir / 'report.html'}, report.json, responses.jsonl ({timings['total']:.0f} s)")
    return results
