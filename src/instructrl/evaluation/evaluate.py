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
``write_report`` is public so the pipeline can add its own sections (rounds, stage timings).
``instructrl eval ifeval`` (``run_ifeval``) answers the public IFEval prompts and scores them.
See docs/evaluation.md.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import random
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from instructrl.config import ConfigError, check, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.tasks.labelers import DEFAULT_NOISE

# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@dataclass
class EvalLabelers:
    n_train: int = param(6, "training labelers in the pool (they never judge evaluations)")
    n_heldout: int = param(3, "held-out labelers: the only ones that judge here (InstructGPT §4)")
    noise: float = param(DEFAULT_NOISE, "labeler noise (gold-score units); the default gives ~73% inter-labeler agreement")
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
    best_of_n: int = param(0, "N > 0 adds the policy 'best-of-N': N samples from the reference, the RM's favourite kept")
    n_prompts: int = param(200, "prompts evaluated (a seeded subset of `tasks`); 0 = all")
    max_new_tokens: int = param(128, "response length limit")
    max_prompt_tokens: int = param(256, "prompts longer than this are cut from the left")
    temperature: float = param(1.0, "sampling temperature (InstructGPT samples at T = 1)")
    greedy: bool = param(False, "greedy decoding instead of sampling (then 'KL' is the log-ratio on the greedy answer)")
    batch_size: int = param(64, "prompts per generation batch (decoding reads every weight once a token, so bigger batches are nearly free: 318 vs 178 tok/s at 64 vs 16 on 2 cores)")
    micro_batch_size: int = param(8, "sequences per forward pass when scoring (KL, RM, pretraining text)")
    seed: int = param(0, "seed for the prompt subset, sampling, labeler noise and bootstrap")
    labeler_seed: int = param(0, "seed of LabelerPool.default: the pipeline's data seed, so the held-out labelers "
                                 "are the same simulated people as in training's pool")
    labelers: EvalLabelers = param(EvalLabelers(), "the rest of the simulated labeler pool (held-out labelers judge)")
    bootstrap: int = param(1000, "bootstrap resamples for the Elo and alignment-tax intervals")
    ppo_runs: dict[str, str] = param(factory=dict, help="name -> PPO run folder (metrics.jsonl) for reward vs √KL curves")
    pretrain_eval: str = param("", "held-out plain-text JSONL ({text}) for the alignment tax; empty = skip")
    pretrain_max_texts: int = param(200, "at most this many pretraining texts (the first ones)")
    pretrain_max_tokens: int = param(256, "each pretraining text is cut to this many tokens")
    output_dir: str = param("runs/eval", "report.html, report.json, PNGs, responses.jsonl go here")
    device: str = device_field()
    precision: Precision = precision_field()
    threads: int = param(0, "torch CPU threads; 0 = torch's default")
    examples: int = param(3, "prompts shown with every policy's answer in the report")

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


@dataclass
class IFEvalConfig:
    data: str = param("", "IFEval JSON Lines (key, prompt, instruction_id_list, kwargs); required")
    model: str = param("default", "model folder to evaluate; 'default' = the embedded SmolLM2-135M-Instruct")
    max_new_tokens: int = param(512, "response length limit (the reference harness allows 1280)")
    max_prompt_tokens: int = param(1024, "prompts longer than this are cut from the left")
    greedy: bool = param(True, "greedy decoding (the usual IFEval setting); false = sample at `temperature`")
    temperature: float = param(1.0, "sampling temperature when greedy=false")
    batch_size: int = param(8, "prompts per generation batch")
    limit: int = param(0, "evaluate only the first N rows; 0 = all")
    seed: int = param(0, "sampling seed")
    output_dir: str = param("runs/ifeval", "ifeval.json and responses.jsonl go here")
    device: str = device_field()
    precision: Precision = precision_field()
    threads: int = param(0, "torch CPU threads; 0 = torch's default")

    def validate(self):
        check(bool(self.data), "data: an IFEval JSONL file is required (data=PATH)")
        check(self.max_new_tokens >= 1 and self.max_prompt_tokens >= 1, "max_new_tokens/max_prompt_tokens must be >= 1")
        check(self.temperature > 0, "temperature must be > 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.limit >= 0, "limit must be >= 0")


# ---------------------------------------------------------------------------
# Metric functions (pure)
# ---------------------------------------------------------------------------


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean with a normal-approximation interval: mean ± z·s/√n (s = sample std, ddof = 1).

    Returns {"mean", "lo", "hi", "n"}; with n < 2 the interval is the point itself
    (nothing to estimate a spread from); n = 0 gives NaNs.
    """
    from statistics import NormalDist

    x = np.asarray(list(values), dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    m = float(x.mean())
    if n < 2:
        return {"mean": m, "lo": m, "hi": m, "n": n}
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate Σ_t mask·(log π − log π_ref) (the k1 estimator PPO penalises, eq. 2).

    logprobs, ref_logprobs, mask: [B, R] (mask 1 on real response tokens, EOS included). Returns [B].
    On samples from π its expectation is KL(π ‖ π_ref) in nats.
    """
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n nats (Stiennon et al. 2020 App. G; exact for distinct samples).

    The best-of-n policy's samples are the reference's own tokens, so the plug-in
    estimate on them would be 0; this closed form is the standard figure.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_pick(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the highest-scoring answer in each consecutive group of ``n`` (the first one on ties).

    ``scores``: [P·n] RM scores, the n samples of prompt p at positions p·n .. p·n + n − 1.
    """
    if n < 1 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not split into groups of {n}")
    return [p * n + int(np.argmax(scores[p * n:(p + 1) * n])) for p in range(len(scores) // n)]


def gold_gain(gold: Sequence[float], baseline_gold: Sequence[float], level: float = 0.95) -> dict:
    """Mean per-prompt gold-score difference against the baseline, with a paired interval (``mean_ci``).

    ``gold``, ``baseline_gold``: one gold score per prompt, same prompt order. A labeler's
    verdict on one pair is a coin flip whenever the two answers differ by less than its
    noise (0.165 on a [0, 1] scale, about one constraint), so the labeler win rate needs
    a large gain before its interval leaves 0.5; the paired difference of the
    noise-free gold scores shows a small gain (or loss) that the win rate cannot.
    """
    if len(gold) != len(baseline_gold):
        raise ValueError(f"{len(gold)} vs {len(baseline_gold)} gold scores")
    return mean_ci([a - b for a, b in zip(gold, baseline_gold)], level)


def score_outcomes(a_scores: Sequence[float], b_scores: Sequence[float],
                   a_texts: Sequence[str] | None = None, b_texts: Sequence[str] | None = None) -> list[float]:
    """RM judgment of each prompt: 1 if a's score is higher, 0 if lower, 0.5 if equal or the texts are identical."""
    if len(a_scores) != len(b_scores):
        raise ValueError(f"{len(a_scores)} vs {len(b_scores)} scores")
    out = []
    for i, (sa, sb) in enumerate(zip(a_scores, b_scores)):
        same = a_texts is not None and b_texts is not None and a_texts[i] == b_texts[i]
        out.append(0.5 if same or sa == sb else (1.0 if sa > sb else 0.0))
    return out


def outcomes_win_rate(outcomes: Sequence[float], level: float = 0.95) -> dict:
    """Win rate of a list of outcomes (1 win, 0 loss, 0.5 tie): ties count half, Wilson interval (stats.win_rate)."""
    from instructrl.core.stats import win_rate

    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    if wins + ties + sum(1 for o in outcomes if o == 0.0) != len(outcomes):
        raise ValueError("outcomes must be 0, 0.5 or 1")
    return win_rate(wins, ties, len(outcomes), level).as_dict()


def rm_gold_agreement(rm: dict[str, Sequence[float]], gold: dict[str, Sequence[float]],
                      texts: dict[str, Sequence[str]], min_gap: float = 0.15, level: float = 0.95) -> dict:
    """How often the RM orders two answers to the same prompt as the gold scorer does.

    ``rm``, ``gold``, ``texts``: policy -> one value per prompt (same prompt order).
    Every pair of distinct answers to one prompt whose gold scores differ by at least
    ``min_gap`` (0.15 ~ one constraint of five) counts; an RM tie counts half.
    Returns {rate, lo, hi, n}; 0.5 is an RM that knows nothing the gold scorer
    rewards, and then PPO against it cannot beat SFT by the labelers. The CI treats
    pairs as independent (they share prompts, so it is somewhat too narrow).
    """
    from instructrl.core.stats import proportion_ci

    names = list(rm)
    n_prompts = len(rm[names[0]]) if names else 0
    hits, n = 0.0, 0
    for i in range(n_prompts):
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                d = gold[a][i] - gold[b][i]
                if abs(d) < min_gap or texts[a][i] == texts[b][i]:
                    continue
                r = rm[a][i] - rm[b][i]
                hits += 0.5 if r == 0 else float(r * d > 0)
                n += 1
    if n == 0:
        return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "min_gap": min_gap}
    lo, hi = proportion_ci(hits, n, level)
    return {"rate": hits / n, "lo": lo, "hi": hi, "n": n, "min_gap": min_gap}


def reward_vs_sqrt_kl(rows: Sequence[dict], score_key: str = "score", kl_key: str = "kl") -> dict:
    """Points (√KL, mean RM score) of a PPO run's metrics rows and their least-squares line.

    HH (Bai et al. 2022 §4.3) found reward roughly linear in √KL. KL estimates below
    0 (the k1 estimator can dip under 0 early on) are clipped to 0 before the root.
    Returns {"points": [[sqrt_kl, score, step], ...], "fit": {"slope", "intercept", "r2"} or None, "why"}.
    """
    from instructrl.core.stats import linear_fit

    pts = []
    for r in rows:
        kl, s = r.get(kl_key), r.get(score_key)
        if isinstance(kl, (int, float)) and isinstance(s, (int, float)) and math.isfinite(kl) and math.isfinite(s):
            pts.append([math.sqrt(max(float(kl), 0.0)), float(s), r.get("step")])
    out: dict[str, Any] = {"points": pts, "fit": None, "why": ""}
    xs = [p[0] for p in pts]
    if len(pts) < 2:
        out["why"] = f"{len(pts)} logged step(s): a line needs 2"
    elif max(xs) == min(xs):
        out["why"] = "√KL is constant over the run: the slope is undefined"
    else:
        slope, intercept, r2 = linear_fit(xs, [p[1] for p in pts])
        out["fit"] = {"slope": slope, "intercept": intercept, "r2": r2}
    return out


def loglik_bootstrap(sums: dict[str, Sequence[float]], counts: dict[str, Sequence[int]], baseline: str | None,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean per-token log-likelihood Σ sums / Σ counts per model, with percentile bootstrap CIs over texts.

    ``sums[m][i]``: total log-likelihood of text i under model m; ``counts[m][i]``: its predicted tokens.
    Every model is resampled with the same text indices, so ``delta`` (model − baseline) is a
    paired difference: the alignment tax when negative (InstructGPT §4.2).
    """
    names = list(sums)
    n = len(sums[names[0]]) if names else 0
    if any(len(sums[k]) != n or len(counts[k]) != n for k in names):
        raise ValueError("every model needs one sum and one count per text")
    if n == 0:
        raise ValueError("no texts")
    S = {k: np.asarray(sums[k], dtype=np.float64) for k in names}
    C = {k: np.asarray(counts[k], dtype=np.float64) for k in names}
    rng = np.random.default_rng(seed)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [n_boot, n]
    reps = {k: (W @ S[k]) / np.maximum(W @ C[k], 1.0) for k in names}
    a = (1 - level) / 2
    out = {}
    for k in names:
        mean = float(S[k].sum() / max(C[k].sum(), 1.0))
        row = {"mean": mean, "lo": float(np.quantile(reps[k], a)), "hi": float(np.quantile(reps[k], 1 - a)),
               "tokens": int(C[k].sum())}
        if baseline is not None and baseline in S:
            base = float(S[baseline].sum() / max(C[baseline].sum(), 1.0))
            d = reps[k] - reps[baseline]
            row["delta"] = {"mean": mean - base, "lo": float(np.quantile(d, a)), "hi": float(np.quantile(d, 1 - a))}
        out[k] = row
    return out


# ---------------------------------------------------------------------------
# Generation and scoring (models in, numbers out)
# ---------------------------------------------------------------------------


@dataclass
class Samples:
    """One answer per prompt, in prompt order.

    texts:    decoded responses (special tokens, EOS included, removed)
    tokens:   response length in tokens, EOS not counted
    ended:    True where the answer ended with EOS within max_new_tokens
    kl:       per-answer Σ_t log π − log π_ref, or None when not computed
    """

    texts: list[str]
    tokens: list[int]
    ended: list[bool]
    kl: list[float] | None = None


def _autocast(amp: torch.dtype | None):
    return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)


def seed_for(seed: int, name: str) -> int:
    """A per-policy seed that does not depend on the order policies are listed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def encode_prompts(tok, messages_list: Sequence[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-template prompt ids (formatting.encode_prompt), cut from the left to ``max_prompt_tokens``."""
    from instructrl.formatting import encode_prompt_for_sampling

    return [encode_prompt_for_sampling(tok, m, max_prompt_tokens) for m in messages_list]


# no_grad, not inference_mode: under inference_mode autocast caches no weight casts (rollout.sample).
@torch.no_grad()
def generate(model, tok, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, batch_size: int = 16, seed: int = 0, amp: torch.dtype | None = None,
             ref=None, micro_batch_size: int = 8, desc: str | None = None) -> Samples:
    """Answer every prompt with ``rollout.sample`` (KV cache, left padding); optionally the KL to ``ref``.

    Prompts are batched in order of length (less padding) and answers returned in
    prompt order. Greedy decoding is top-k = 1. With ``ref``, each answer's sequence
    KL is computed from the same logits PPO uses (temperature-scaled; T = 1 when greedy).
    """
    from tqdm.auto import tqdm

    from instructrl.models import autocast_weight_cache
    from instructrl.core.tensors import gather_logprobs
    from instructrl.scoring import micro_batches, response_logits, window
    from instructrl.rollout import sample

    model.eval()
    if ref is not None:
        ref.eval()
    gen = torch.Generator().manual_seed(seed)
    n = len(prompt_ids)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    texts: list[str] = [""] * n
    tokens = [0] * n
    ended = [False] * n
    kls = [0.0] * n
    t_lp = 1.0 if greedy else temperature
    eos, pad = tok.eos_token_id, tok.pad_token_id
    bar = tqdm(total=n, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        g = sample(model, [prompt_ids[i] for i in idx], max_new_tokens, eos, pad, gen,
                   1.0 if greedy else temperature, 1 if greedy else 0, amp)
        mask = g.response_mask
        if ref is not None:
            kl = torch.zeros(len(idx))
            with autocast_weight_cache(model, ref), _autocast(amp):
                for rows, p, r in micro_batches(torch.arange(len(idx)), g.query_mask, mask, micro_batch_size):
                    ids, am = window(g, rows, p, r)
                    toks = g.response[rows, :r]
                    lp = gather_logprobs(response_logits(model, ids, am, r, t_lp), toks)
                    rlp = lp if ref is model else gather_logprobs(response_logits(ref, ids, am, r, t_lp), toks)
                    kl[rows] = sequence_kl(lp, rlp, mask[rows, :r]).float()
        for j, i in enumerate(idx):
            real = g.response[j][mask[j].bool()].tolist()
            if real and real[-1] == eos and bool(g.ended[j]):
                real = real[:-1]
            texts[i] = tok.decode(real, skip_special_tokens=True)
            tokens[i] = len(real)
            ended[i] = bool(g.ended[j])
            if ref is not None:
                kls[i] = float(kl[j])
        bar.update(len(idx))
    bar.close()
    return Samples(texts, tokens, ended, kls if ref is not None else None)


def generate_responses(model, tok, messages_list: Sequence[list[dict]], *, max_new_tokens: int,
                       max_prompt_tokens: int = 1024, temperature: float = 1.0, greedy: bool = True,
                       batch_size: int = 8, seed: int = 0, amp: torch.dtype | None = None,
                       desc: str | None = None) -> list[str]:
    """Text answers to chat prompts (the chat template, then :func:`generate`)."""
    ids = encode_prompts(tok, messages_list, max_prompt_tokens)
    return generate(model, tok, ids, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                    batch_size=batch_size, seed=seed, amp=amp, desc=desc).texts


@torch.no_grad()
def rm_scores(rm, rm_tok, messages_list: Sequence[list[dict]], texts: Sequence[str], ended: Sequence[bool],
              max_prompt_tokens: int, micro_batch_size: int = 8, amp: torch.dtype | None = None,
              desc: str | None = None, rm_eos: bool = True) -> list[float]:
    """Reward-model score of each (prompt, answer), in the formatting rule's token layout.

    ``rm_eos`` (PPO's ``rollout.rm_eos``): an answer cut off at max_new_tokens is scored
    with EOS appended, as the finished answer a labeler would judge; False = scored at
    its last token, without EOS (``ended`` says which answers emitted EOS themselves).
    """
    from tqdm.auto import tqdm

    from instructrl.formatting import encode_response, pad
    from instructrl.models import autocast_weight_cache
    from instructrl.reward_model import score

    rm.eval()
    prompts = encode_prompts(rm_tok, messages_list, max_prompt_tokens)
    seqs = [p + encode_response(rm_tok, t, add_eos=e or rm_eos) for p, t, e in zip(prompts, texts, ended)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    pad_id = rm.config.pad_token_id
    with autocast_weight_cache(rm), _autocast(amp):  # one block: each weight cast to bf16 once
        for start in tqdm(range(0, len(seqs), micro_batch_size), desc=desc, disable=desc is None, leave=False):
            idx = order[start:start + micro_batch_size]
            ids, mask = pad([seqs[i] for i in idx], pad_id, "right")
            s = score(rm, ids, mask).float()
            for j, i in enumerate(idx):
                out[i] = float(s[j])
    return out


@torch.no_grad()
def text_logliks(model, tok, texts: Sequence[str], max_tokens: int, micro_batch_size: int = 8,
                 amp: torch.dtype | None = None) -> tuple[list[float], list[int]]:
    """Per text: (Σ log p(token_t | tokens_<t), number of predicted tokens), the first token unpredicted.

    Texts are tokenized without special tokens and cut to ``max_tokens`` (as PPO-ptx does).
    """
    from instructrl.formatting import pad
    from instructrl.core.losses import token_logprobs

    model.eval()
    ids_list = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    sums, counts = [0.0] * len(ids_list), [0] * len(ids_list)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    for start in range(0, len(order), micro_batch_size):
        idx = [i for i in order[start:start + micro_batch_size] if len(ids_list[i]) >= 2]
        if not idx:
            continue
        ids, am = pad([ids_list[i] for i in idx], tok.pad_token_id or 0, "right")
        with _autocast(amp):
            logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        lp = token_logprobs(logits, ids)
        m = am.float()
        m[:, 0] = 0
        s = (lp * m).sum(1)
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(s[j]), int(m[j].sum())
    return sums, counts


def labeler_outcome(pool, task, a: str, b: str, a_text: str, b_text: str, seed: int) -> float:
    """Held-out labeler judgment of a vs b on one prompt: 1 (a), 0 (b), 0.5 (identical answers).

    The random stream (which held-out labeler, their noise) is seeded by the prompt
    and the unordered pair of policy names, so a judgment is the same whichever
    order the policies are listed in, and the same comparison feeds both the win
    rate and the Bradley-Terry fit.
    """
    first, second = sorted((a, b))
    rng = random.Random(f"{seed}|{task.id}|{first}|{second}")
    x, y = (a_text, b_text) if first == a else (b_text, a_text)
    o = pool.prefers(task, x, y, rng)
    return o if first == a else 1.0 - o


# ---------------------------------------------------------------------------
# The evaluation
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
    return {name: _read_ppo_metrics(path) for name, path in cfg.ppo_runs.items()}


def run_eval(cfg: EvalConfig, extra_sections: Sequence["ReportSection | dict | tuple"] = ()) -> dict:
    """``instructrl eval``: every metric of every policy on the same held-out prompts; writes the report.

    ``extra_sections`` go to :func:`write_report` (the pipeline's rounds and stage timings).
    Returns the results dict that report.json holds.
    """
    from instructrl.data import load_text_corpus
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.reward_model import load_reward_model
    from instructrl.core.stats import bootstrap_ratings, proportion_ci
    from instructrl.tasks import gold_score, load_tasks, satisfies_all
    from instructrl.tasks.labelers import LabelerPool

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rt = make_runtime(cfg.device, cfg.precision)
    cfg.precision = rt.precision  # saved resolved, so report.json says what ran
    amp = rt.amp_dtype
    out_dir = Path(cfg.output_dir)

    # ---- 1. prompts: a seeded subset of the held-out tasks ----
    ppo_metrics = check_inputs(cfg)
    tasks = load_tasks(cfg.tasks)
    if not tasks:
        raise ConfigError(f"tasks: {cfg.tasks} has no tasks")
    if cfg.n_prompts and cfg.n_prompts < len(tasks):
        keep = sorted(random.Random(cfg.seed).sample(range(len(tasks)), cfg.n_prompts))
        tasks = [tasks[i] for i in keep]
    messages = [[{"role": "user", "content": t.prompt}] for t in tasks]
    pool = LabelerPool.default(cfg.labelers.n_train, cfg.labelers.n_heldout, cfg.labeler_seed, cfg.labelers.noise,
                               cfg.labelers.noise_kind)
    print(f"[eval] {len(tasks)} held-out prompts, {len(cfg.policies)} policies"
          + (f" + best-of-{cfg.best_of_n}" if cfg.best_of_n else "") + f", judged by {len(pool.heldout)} held-out "
          f"simulated labelers and the RM")

    # ---- 2-3. sample every policy (with its KL to the reference), then best-of-N from the reference ----
    t0 = time.perf_counter()
    ref_path = cfg.reference_path
    ref = load_causal_lm(ref_path).eval().requires_grad_(False)
    ref_tok = load_tokenizer(ref_path)
    ref_vocab = ref_tok.get_vocab()
    samples: dict[str, Samples] = {}
    sources: dict[str, str] = {}
    notes: dict[str, str] = {}
    models_for_tax: dict[str, str] = {}
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, greedy=cfg.greedy,
                  batch_size=cfg.batch_size, amp=amp, micro_batch_size=cfg.micro_batch_size)
    for name, path in cfg.policies.items():
        tok = load_tokenizer(path)
        is_ref = _same_folder(path, ref_path)
        model = ref if is_ref else load_causal_lm(path).eval().requires_grad_(False)
        same_vocab = tok.get_vocab() == ref_vocab
        if not same_vocab:
            notes[name] = "tokenizer differs from the reference: no KL"
        samples[name] = generate(model, tok, encode_prompts(tok, messages, cfg.max_prompt_tokens),
                                 seed=seed_for(cfg.seed, name), ref=ref if same_vocab else None,
                                 desc=f"eval {name}", **gen_kw)
        sources[name] = path
        models_for_tax[name] = path
        if not is_ref:
            del model
    timings["sample_policies"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm = load_reward_model(cfg.reward_model).eval().requires_grad_(False)
    rm_tok = load_tokenizer(cfg.reward_model)
    bon_name = None
    if cfg.best_of_n:
        bon_name = f"best-of-{cfg.best_of_n}"
        N = cfg.best_of_n
        rep = [m for m in messages for _ in range(N)]
        s = generate(ref, ref_tok, encode_prompts(ref_tok, rep, cfg.max_prompt_tokens),
                     seed=seed_for(cfg.seed, bon_name), desc=f"eval {bon_name} (sampling {N}x)", **gen_kw)
        sc = rm_scores(rm, rm_tok, rep, s.texts, s.ended, cfg.max_prompt_tokens, cfg.micro_batch_size, amp,
                       desc=f"RM {bon_name}", rm_eos=cfg.rm_eos)
        pick = best_of_n_pick(sc, N)
        samples[bon_name] = Samples([s.texts[j] for j in pick], [s.tokens[j] for j in pick],
                                    [s.ended[j] for j in pick], [best_of_n_kl(N)] * len(tasks))
        sources[bon_name] = f"{N} samples from {ref_path}, RM's favourite kept"
        notes[bon_name] = f"KL is the closed form log N − (N−1)/N = {best_of_n_kl(N):.3f} nats"
    del ref
    timings["best_of_n"] = time.perf_counter() - t0
    names = list(samples)

    # ---- 4. RM scores ----
    t0 = time.perf_counter()
    scores = {n: rm_scores(rm, rm_tok, messages, samples[n].texts, samples[n].ended, cfg.max_prompt_tokens,
                           cfg.micro_batch_size, amp, desc=f"RM {n}", rm_eos=cfg.rm_eos) for n in names}
    del rm
    timings["rm_scores"] = time.perf_counter() - t0

    # ---- 5. gold scorer ----
    gold_ok = {n: [satisfies_all(t.constraints, x) for t, x in zip(tasks, samples[n].texts)] for n in names}
    gold = {n: [gold_score(t.constraints, x, t.topic_words) for t, x in zip(tasks, samples[n].texts)] for n in names}

    # ---- 6. judgments: held-out labelers on every pair of policies, RM on the same pairs ----
    t0 = time.perf_counter()
    comparisons = []  # (a, b, outcome) for Bradley-Terry
    pair_lab: dict[str, dict[str, float]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            outs = [labeler_outcome(pool, t, a, b, xa, xb, cfg.seed)
                    for t, xa, xb in zip(tasks, samples[a].texts, samples[b].texts)]
            comparisons += [(a, b, o) for o in outs]
            pair_lab[a][b] = float(np.mean(outs))
            pair_lab[b][a] = 1.0 - pair_lab[a][b]
    base = cfg.baseline
    per_policy: dict[str, dict] = {}
    for n in names:
        lab = [labeler_outcome(pool, t, n, base, xa, xb, cfg.seed) if n != base else 0.5
               for t, xa, xb in zip(tasks, samples[n].texts, samples[base].texts)]
        rmo = score_outcomes(scores[n], scores[base], samples[n].texts, samples[base].texts)
        sat = sum(gold_ok[n])
        lo, hi = proportion_ci(sat, len(tasks))
        wl, wr = outcomes_win_rate(lab), outcomes_win_rate(rmo)
        s = samples[n]
        per_policy[n] = {
            "source": sources[n],
            "win_rate_labelers": wl,
            "win_rate_rm": wr,
            "rm_minus_labeler": wr["rate"] - wl["rate"],
            "gold_satisfaction": {"rate": sat / len(tasks), "lo": lo, "hi": hi, "n": len(tasks)},
            "gold_score": mean_ci(gold[n]),
            "gold_gain": gold_gain(gold[n], gold[base]),
            "rm_score": mean_ci(scores[n]),
            "kl": mean_ci(s.kl) if s.kl is not None else None,
            "length_tokens": mean_ci(s.tokens),
            "length_words": mean_ci([len(x.split()) for x in s.texts]),
            "missing_eos": 1.0 - sum(s.ended) / len(s.ended),
            "note": notes.get(n, ""),
        }
    timings["judge"] = time.perf_counter() - t0

    # ---- 7. Bradley-Terry / Elo from every pairwise labeler comparison ----
    elo = None
    if len(names) >= 2:
        ratings = bootstrap_ratings(comparisons, n_boot=cfg.bootstrap, seed=cfg.seed, players=names, baseline=base)
        elo = {n: r.as_dict() for n, r in ratings.items()}
        for n in names:
            per_policy[n]["elo"] = elo[n]

    # ---- 8. reward vs √KL during PPO ----
    curves = {name: reward_vs_sqrt_kl(rows) | {"run": cfg.ppo_runs[name]} for name, rows in ppo_metrics.items()}

    # ---- 9. alignment tax: log-likelihood of held-out pretraining text ----
    t0 = time.perf_counter()
    tax = None
    if cfg.pretrain_eval:
        texts = load_text_corpus(cfg.pretrain_eval)[: cfg.pretrain_max_texts]
        sums, counts = {}, {}
        for n, path in models_for_tax.items():
            model = load_causal_lm(path).eval().requires_grad_(False)
            sums[n], counts[n] = text_logliks(model, load_tokenizer(path), texts, cfg.pretrain_max_tokens,
                                              cfg.micro_batch_size, amp)
            del model
        keep = [i for i in range(len(texts)) if all(counts[n][i] > 0 for n in sums)]
        if not keep:
            raise ConfigError(f"pretrain_eval: {cfg.pretrain_eval} has no text of 2 or more tokens")
        tax = {"data": cfg.pretrain_eval, "n_texts": len(keep), "max_tokens": cfg.pretrain_max_tokens,
               "baseline": base,
               "policies": loglik_bootstrap({n: [sums[n][i] for i in keep] for n in sums},
                                            {n: [counts[n][i] for i in keep] for n in sums},
                                            base, cfg.bootstrap, seed=cfg.seed)}
        if bon_name:
            tax["note"] = f"{bon_name} samples from the reference model: its likelihood is the reference's"
    timings["alignment_tax"] = time.perf_counter() - t0

    # ---- 10. report ----
    from instructrl.config import config_to_dict

    examples = []
    for i in range(min(cfg.examples, len(tasks))):
        examples.append({"id": tasks[i].id, "prompt": tasks[i].prompt, "answers": {
            n: {"text": samples[n].texts[i], "gold_ok": gold_ok[n][i], "gold": gold[n][i], "rm": scores[n][i]}
            for n in names}})
    timings["total"] = time.perf_counter() - t_start
    results = {
        "config": config_to_dict(cfg),
        "n_prompts": len(tasks),
        "baseline": base,
        "reference": ref_path,
        "decoding": "greedy" if cfg.greedy else f"sampling, T = {cfg.temperature}",
        "labelers": {"held_out": [l.id for l in pool.heldout], "pool_seed": cfg.labeler_seed,
                     "note": "simulated labelers: a programmatic stand-in for humans (docs/simulated-labelers.md)"},
        "policies": per_policy,
        "pairwise_labelers": pair_lab,
        "rm_gold_agreement": rm_gold_agreement(scores, gold, {n: samples[n].texts for n in names}),
        "elo": elo,
        "reward_vs_sqrt_kl": curves,
        "alignment_tax": tax,
        "examples": examples,
        "timings": timings,
    }
    from instructrl.io import write_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "responses.jsonl", (
        {"id": t.id, "user_id": t.user_id, "policy": n, "response": samples[n].texts[i], "ended": samples[n].ended[i],
         "tokens": samples[n].tokens[i], "rm_score": scores[n][i], "gold_score": gold[n][i],
         "satisfies_all": gold_ok[n][i], "kl": None if samples[n].kl is None else samples[n].kl[i]}
        for n in names for i, t in enumerate(tasks)))
    results = write_report(results, out_dir, extra_sections)["results"]
    print(format_summary(results))
    print(f"[eval] wrote {out_dir / 'report.html'}, report.json, responses.jsonl ({timings['total']:.0f} s)")
    return results


def _rm_gold_text(results: dict) -> str:
    g = results.get("rm_gold_agreement")
    if not g or not g.get("n"):
        return ""
    return (f"RM agrees with the gold scorer on {g['rate']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}] of {g['n']} pairs of "
            f"answers to the same prompt (gold gap >= {g['min_gap']}); 0.5 = the RM has not learnt what the gold "
            f"scorer (and so the labelers) reward.")


def _rm_gold_note(results: dict) -> str:
    t = _rm_gold_text(results)
    return f"<p class='note'>{html.escape(t)}</p>" if t else ""


def format_summary(results: dict) -> str:
    """A plain-text table of the headline numbers (what the command prints)."""
    lines = [f"{'policy':<14} {'win(lab)':>22} {'win(RM)':>22} {'gold ok':>8} {'gold gain':>24} {'KL':>8} {'len':>6} "
             f"{'Elo':>7}"]
    for n, p in results["policies"].items():
        wl, wr = p["win_rate_labelers"], p["win_rate_rm"]
        kl = p["kl"]["mean"] if p.get("kl") else float("nan")
        elo = p["elo"]["rating"] if p.get("elo") else float("nan")
        gg = p.get("gold_gain") or {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
        lines.append(f"{n:<14} {wl['rate']:>6.3f} [{wl['lo']:.3f}, {wl['hi']:.3f}] {wr['rate']:>6.3f} "
                     f"[{wr['lo']:.3f}, {wr['hi']:.3f}] {p['gold_satisfaction']['rate']:>8.3f} "
                     f"{gg['mean']:>+7.3f} [{gg['lo']:+.3f}, {gg['hi']:+.3f}] {kl:>8.3f} "
                     f"{p['length_tokens']['mean']:>6.1f} {elo:>7.0f}")
    rm_gold = _rm_gold_text(results)
    if rm_gold:
        lines.append(rm_gold)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Report: plots, HTML, JSON
# ---------------------------------------------------------------------------


@dataclass
class ReportSection:
    """An extra report section (the pipeline adds per-round results and stage timings).

    title:   section heading
    text:    a paragraph (plain text, escaped)
    columns: table header; rows: table rows (numbers are formatted, everything else str())
    images:  PNG files to embed (base64) under the table
    data:    anything JSON-able, copied into report.json
    """

    title: str
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    data: Any = None

    @classmethod
    def coerce(cls, s: "ReportSection | dict | tuple") -> "ReportSection":
        """A ReportSection from itself, a dict of its fields, or a ``(title, payload)`` pair where payload is
        a mapping (a key/value table), a list of mappings (one row each; nested keys dotted) or text."""
        if isinstance(s, ReportSection):
            return s
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
            title, payload = s
            if isinstance(payload, str):
                return cls(title, text=payload, data=payload)
            if isinstance(payload, dict):
                return cls(title, columns=["", ""], rows=[[k, v] for k, v in payload.items()], data=payload)
            if isinstance(payload, (list, tuple)) and all(isinstance(r, dict) for r in payload):
                flat = [_flatten(r) for r in payload]
                cols = list(dict.fromkeys(k for r in flat for k in r))
                return cls(title, columns=cols, rows=[[r.get(c) for c in cols] for r in flat], data=list(payload))
            raise ValueError(f"extra section {title!r}: payload must be text, a mapping or a list of mappings")
        if not isinstance(s, dict) or "title" not in s:
            raise ValueError(f"an extra section must be a ReportSection or a dict with a 'title', got {s!r}")
        unknown = set(s) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"extra section {s['title']!r}: unknown keys {sorted(unknown)}")
        return cls(**s)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has neither); tuples -> lists; numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_fig(fig, path: Path) -> bytes:
    import io as _io

    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    _atomic_write_bytes(path, data)
    return data


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(results: dict, path: Path) -> bytes:
    """Win rate vs the baseline per policy: held-out labelers and RM side by side, 95% CI bars, 0.5 line."""
    plt = _plt()
    names = list(results["policies"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    for k, (key, label, off) in enumerate((("win_rate_labelers", "held-out labelers", -0.2),
                                           ("win_rate_rm", "reward model", 0.2))):
        w = [results["policies"][n][key] for n in names]
        r = np.array([v["rate"] for v in w])
        err = np.array([[v["rate"] - v["lo"] for v in w], [v["hi"] - v["rate"] for v in w]])
        ax.bar(x + off, r, 0.4, yerr=err, capsize=3, label=label, color=("#4c72b0", "#dd8452")[k])
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {results['baseline']}")
    ax.set_title(f"win rate vs {results['baseline']} (95% CI), {results['n_prompts']} prompts", fontsize=10)
    ax.legend(fontsize=8)
    return _save_fig(fig, path)


def plot_elo(results: dict, path: Path) -> bytes:
    plt = _plt()
    elo = results["elo"]
    names = sorted(elo, key=lambda n: elo[n]["rating"])
    fig, ax = plt.subplots(figsize=(5, 0.5 * len(names) + 1.6))
    y = np.arange(len(names))
    r = np.array([elo[n]["rating"] for n in names])
    err = np.array([[elo[n]["rating"] - elo[n]["lo"] for n in names], [elo[n]["hi"] - elo[n]["rating"] for n in names]])
    ax.errorbar(r, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"Elo (Bradley-Terry; {results['baseline']} = 1000)")
    ax.set_title("Elo from held-out labeler comparisons (95% bootstrap CI)", fontsize=10)
    return _save_fig(fig, path)


def plot_gold(results: dict, path: Path) -> bytes:
    plt = _plt()
    names = list(results["policies"])
    g = [results["policies"][n]["gold_satisfaction"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(names) + 2), 3.4))
    r = np.array([v["rate"] for v in g])
    err = np.array([[v["rate"] - v["lo"] for v in g], [v["hi"] - v["rate"] for v in g]])
    ax.bar(np.arange(len(names)), r, 0.6, yerr=err, capsize=3, color="#55a868")
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share satisfying every constraint")
    ax.set_title("gold constraint satisfaction (95% Wilson CI)", fontsize=10)
    return _save_fig(fig, path)


def plot_reward_vs_sqrt_kl(results: dict, path: Path) -> bytes | None:
    curves = results.get("reward_vs_sqrt_kl") or {}
    if not any(c["points"] for c in curves.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name, c in curves.items():
        if not c["points"]:
            continue
        xs = np.array([p[0] for p in c["points"]])
        ys = np.array([p[1] for p in c["points"]])
        pts = ax.plot(xs, ys, "o", ms=3, alpha=0.7, label=name)
        if c["fit"]:
            f = c["fit"]
            line = np.linspace(xs.min(), xs.max(), 20)
            ax.plot(line, f["slope"] * line + f["intercept"], "-", color=pts[0].get_color(),
                    label=f"{name}: {f['slope']:.3f}·√KL {'+' if f['intercept'] >= 0 else '−'} "
                          f"{abs(f['intercept']):.3f} (r² {f['r2']:.2f})")
    ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats, per sequence)")
    ax.set_ylabel("mean RM score per PPO step")
    ax.set_title("reward vs √KL during PPO", fontsize=10)
    ax.legend(fontsize=7)
    return _save_fig(fig, path)


def plot_alignment_tax(results: dict, path: Path) -> bytes | None:
    tax = results.get("alignment_tax")
    if not tax:
        return None
    plt = _plt()
    pol = tax["policies"]
    names = list(pol)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(names) + 2), 3.4))
    r = np.array([pol[n]["mean"] for n in names])
    err = np.array([[pol[n]["mean"] - pol[n]["lo"] for n in names], [pol[n]["hi"] - pol[n]["mean"] for n in names]])
    ax.errorbar(np.arange(len(names)), r, yerr=err, fmt="o", capsize=4)
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylabel("mean log-likelihood per token (nats)")
    ax.set_title("held-out pretraining text (higher = less alignment tax)", fontsize=10)
    return _save_fig(fig, path)


HOW_TO_READ = [
    "Every policy answered the same held-out prompts (from users whose prompts were never trained on). "
    "A win rate is the share of prompts on which the policy's answer was preferred to the baseline's, "
    "ties counting half; 0.5 means no difference. The bars and brackets are 95% confidence intervals "
    "(Wilson): a policy beats the baseline convincingly when the whole interval is above 0.5.",
    "Two judges see the same pairs. The held-out simulated labelers (a programmatic stand-in for people; "
    "they never labeled training data) judge by the gold constraint score plus their own noise and taste. "
    "The reward model judges by its score. An RM-judged win rate far above the labeler-judged one means the "
    "policy learnt to please the reward model rather than the people it stands for: reward over-optimisation "
    "(the RM − labeler column; Gao et al. 2022, InstructGPT §4).",
    "Gold satisfaction is the share of answers that meet every constraint of their prompt, checked by rule, "
    "with no judge at all. Gold gain is the mean per-prompt difference of the gold score to the baseline's "
    "answer, with a paired interval: one labeler verdict is close to a coin flip whenever two answers differ by "
    "less than about one constraint, so a gain too small to move the win rate's interval off 0.5 still shows "
    "here. KL is Σ log π/π_SFT over the answer's tokens on the policy's own samples (nats): "
    "how far the policy moved from SFT. For best-of-N it is the closed form log N − (N−1)/N.",
    "Elo ratings come from a Bradley-Terry fit to every pairwise labeler comparison (every pair of policies "
    "on every prompt), anchored at baseline = 1000; 400 points mean 10:1 odds. Intervals are 95% percentile "
    "bootstrap over comparisons (the baseline's is a point by construction).",
    "Reward vs √KL: during PPO the mean RM score grows roughly linearly in √KL (HH paper §4.3); the line is a "
    "least-squares fit. Alignment tax: mean per-token log-likelihood of held-out pretraining text; RLHF "
    "lowers it, and PPO-ptx exists to lower it less (InstructGPT §3.5, §4.2). 'Δ' is the paired difference to "
    "the baseline.",
    "Caveats: the Wilson interval counts a tie as half a success, which is conservative when ties are common "
    "(the baseline against itself shows 0.5 with a wide interval); the Elo bootstrap resamples comparisons "
    "independently although comparisons on one prompt are correlated, so its intervals are somewhat narrow; "
    "with greedy decoding the KL column is the log-ratio on the greedy answer, not a KL.",
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_json_safe(v), ensure_ascii=False)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


def _ci(d: dict | None, key: str = "mean") -> str:
    if not d:
        return "–"
    return f"{_fmt(d[key])} [{_fmt(d['lo'])}, {_fmt(d['hi'])}]"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(str(c) for c in columns) else ""  # key/value tables: no header
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right;vertical-align:top}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.5em 0}.note{color:#666;font-size:.9em}pre{white-space:pre-wrap;background:#f7f7f7;
padding:.4em;margin:0;font-size:.85em;text-align:left}section{margin-bottom:2em}"""


def write_report(results: dict, out_dir: str | Path,
                 extra_sections: Sequence[ReportSection | dict | tuple] = ()) -> dict[str, Any]:
    """Write report.html (self-contained: PNGs embedded as base64, also saved beside it) and report.json.

    ``results``: the dict :func:`run_eval` returns (or report.json read back).
    ``extra_sections``: :class:`ReportSection`s, dicts of its fields, or ``(title, payload)``
    pairs (see :meth:`ReportSection.coerce`) appended to the report, e.g. the pipeline's
    per-round results and stage timings; they go into report.json under "sections" too.
    Every file is written atomically. Returns the paths written (keys "html", "json" and
    one per plot) and, under "results", the dict that report.json holds.
    """
    out = Path(out_dir)
    sections = [ReportSection.coerce(s) for s in extra_sections]
    results = dict(results)
    results["sections"] = [asdict(s) for s in sections]
    pol = results["policies"]
    paths = {}

    pngs = {"win_rates": plot_win_rates(results, out / "win_rates.png"),
            "gold": plot_gold(results, out / "gold_satisfaction.png")}
    pngs["elo"] = plot_elo(results, out / "elo.png") if results.get("elo") else None
    pngs["reward_vs_sqrt_kl"] = plot_reward_vs_sqrt_kl(results, out / "reward_vs_sqrt_kl.png")
    pngs["alignment_tax"] = plot_alignment_tax(results, out / "alignment_tax.png")
    for k, fname in (("win_rates", "win_rates.png"), ("gold", "gold_satisfaction.png"), ("elo", "elo.png"),
                     ("reward_vs_sqrt_kl", "reward_vs_sqrt_kl.png"), ("alignment_tax", "alignment_tax.png")):
        if pngs[k]:
            paths[k] = out / fname

    base = results["baseline"]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>instructrl evaluation</title>"
         f"<style>{CSS}</style></head><body><h1>instructrl evaluation</h1>"]
    h.append("<section><h2>Setup</h2>" + _table(["", ""], [
        ["held-out prompts", results["n_prompts"]], ["baseline", base], ["KL reference", results.get("reference")],
        ["decoding", results.get("decoding")],
        ["judges", f"held-out simulated labelers {', '.join(results['labelers']['held_out'])} and the reward model"],
        ["seed", results["config"].get("seed") if results.get("config") else None],
    ]) + f"<p class='note'>{html.escape(results['labelers']['note'])}</p></section>")
    h.append("<section><h2>How to read this</h2>" + "".join(f"<p>{html.escape(p)}</p>" for p in HOW_TO_READ)
             + "</section>")

    rows = []
    for n, p in pol.items():
        rows.append([n, _ci(p["win_rate_labelers"], "rate"), _ci(p["win_rate_rm"], "rate"), p["rm_minus_labeler"],
                     _ci(p["gold_satisfaction"], "rate"), _ci(p["gold_score"]), _ci(p.get("gold_gain")),
                     _ci(p["rm_score"]), _ci(p.get("kl")),
                     _ci(p["length_tokens"]), p["length_words"]["mean"], p["missing_eos"],
                     _ci(p.get("elo"), "rating")])
    h.append(f"<section><h2>Summary (vs {html.escape(base)})</h2>" + _table(
        ["policy", "win rate, labelers [95% CI]", "win rate, RM [95% CI]", "RM − labelers", "gold: all constraints met",
         "mean gold score", f"gold gain vs {base} (paired) [95% CI]", "mean RM score", "KL from reference (nats)", "length (tokens)", "length (words)",
         "no EOS", "Elo [95% CI]"], rows)
        + "".join(f"<p class='note'>{html.escape(n)}: {html.escape(p['note'])}</p>" for n, p in pol.items()
                  if p.get("note"))
        + "<h3>Win rates, counts</h3>" + _table(
            ["policy", "judge", "wins", "ties", "n", "rate", "lo", "hi"],
            [[n, j, p[k]["wins"], p[k]["ties"], p[k]["n"], p[k]["rate"], p[k]["lo"], p[k]["hi"]]
             for n, p in pol.items() for j, k in (("labelers", "win_rate_labelers"), ("RM", "win_rate_rm"))])
        + _img(pngs["win_rates"], "win rates") + _rm_gold_note(results) + "</section>")

    h.append("<section><h2>Gold constraint satisfaction</h2>" + _table(
        ["policy", "satisfied", "n", "rate", "lo", "hi", "mean gold", "lo", "hi"],
        [[n, round(p["gold_satisfaction"]["rate"] * p["gold_satisfaction"]["n"]), p["gold_satisfaction"]["n"],
          p["gold_satisfaction"]["rate"], p["gold_satisfaction"]["lo"], p["gold_satisfaction"]["hi"],
          p["gold_score"]["mean"], p["gold_score"]["lo"], p["gold_score"]["hi"]] for n, p in pol.items()])
        + _img(pngs["gold"], "gold satisfaction") + "</section>")

    h.append("<section><h2>Elo (Bradley–Terry)</h2>")
    if results.get("elo"):
        names = list(pol)
        h.append(_table(["policy", "Elo", "lo", "hi"], [[n, e["rating"], e["lo"], e["hi"]]
                                                        for n, e in results["elo"].items()]))
        h.append("<h3>Pairwise labeler win rate (row beats column)</h3>" + _table(
            [""] + names, [[a] + [results["pairwise_labelers"][a].get(b) for b in names] for a in names]))
        h.append(_img(pngs["elo"], "Elo"))
    else:
        h.append("<p>Needs at least two policies.</p>")
    h.append("</section>")

    h.append("<section><h2>Reward vs √KL during PPO</h2>")
    curves = results.get("reward_vs_sqrt_kl") or {}
    if curves:
        h.append(_table(["run", "folder", "steps", "slope", "intercept", "r²", "final √KL", "final score", "why no fit"], [
            [n, c.get("run"), len(c["points"]), *((c["fit"]["slope"], c["fit"]["intercept"], c["fit"]["r2"])
                                                  if c["fit"] else (None, None, None)),
             c["points"][-1][0] if c["points"] else None, c["points"][-1][1] if c["points"] else None, c["why"]]
            for n, c in curves.items()]))
        h.append(_img(pngs["reward_vs_sqrt_kl"], "reward vs sqrt KL"))
    else:
        h.append("<p>No PPO runs given (ppo_runs).</p>")
    h.append("</section>")

    h.append("<section><h2>Alignment tax (held-out pretraining text)</h2>")
    tax = results.get("alignment_tax")
    if tax:
        h.append(f"<p>{tax['n_texts']} texts from {html.escape(str(tax['data']))}, each cut to {tax['max_tokens']} "
                 f"tokens. Δ = policy − {html.escape(tax['baseline'])} (paired bootstrap).</p>")
        h.append(_table(["policy", "log-lik / token", "lo", "hi", "tokens", "Δ", "Δ lo", "Δ hi"], [
            [n, t["mean"], t["lo"], t["hi"], t["tokens"], *((t["delta"]["mean"], t["delta"]["lo"], t["delta"]["hi"])
                                                             if "delta" in t else (None, None, None))]
            for n, t in tax["policies"].items()]))
        if tax.get("note"):
            h.append(f"<p class='note'>{html.escape(tax['note'])}</p>")
        h.append(_img(pngs["alignment_tax"], "alignment tax"))
    else:
        h.append("<p>No held-out pretraining text given (pretrain_eval).</p>")
    h.append("</section>")

    if results.get("examples"):
        h.append("<section><h2>Example answers</h2>")
        for ex in results["examples"]:
            h.append(f"<h3>{html.escape(ex['id'])}</h3><p>{html.escape(ex['prompt'])}</p>")
            h.append("<table><thead><tr><th>policy</th><th>answer</th><th>all constraints</th><th>gold</th>"
                     "<th>RM</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{html.escape(n)}</td><td><pre>{html.escape(a['text'])}</pre></td>"
                         f"<td>{_fmt(a['gold_ok'])}</td><td>{_fmt(a['gold'])}</td><td>{_fmt(a['rm'])}</td></tr>"
                         for n, a in ex["answers"].items()) + "</tbody></table>")
        h.append("</section>")

    for s in sections:
        h.append(f"<section><h2>{html.escape(s.title)}</h2>")
        if s.text:
            h.append(f"<p>{html.escape(s.text)}</p>")
        if s.columns or s.rows:
            h.append(_table(s.columns, s.rows))
        for img in s.images:
            h.append(_img(Path(img).read_bytes(), Path(img).name))
        h.append("</section>")

    if results.get("timings"):
        h.append("<section><h2>Evaluation timings (s)</h2>" + _table(["phase", "seconds"], list(
            results["timings"].items())) + "</section>")
    h.append("</body></html>")

    from instructrl.io import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(_json_safe(results), indent=2, ensure_ascii=False))
    atomic_write_text(out / "report.html", "\n".join(h))
    paths["json"], paths["html"] = out / "report.json", out / "report.html"
    paths["results"] = results
    return paths


# ---------------------------------------------------------------------------
# instructrl eval ifeval
# ---------------------------------------------------------------------------


def run_ifeval(cfg: IFEvalConfig) -> dict:
    """``instructrl eval ifeval``: answer the IFEval prompts with the model (chat template), check every
    instruction with :mod:`instructrl.tasks.ifeval`, print and write prompt- and instruction-level accuracy."""
    from instructrl.io import atomic_write_text, write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.tasks.ifeval import evaluate_ifeval, load_ifeval

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = load_ifeval(cfg.data)
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise ConfigError(f"data: {cfg.data} has no rows")
    rt = make_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model).eval().requires_grad_(False)
    t0 = time.perf_counter()
    responses = generate_responses(
        model, tok, [[{"role": "user", "content": r.prompt}] for r in rows], max_new_tokens=cfg.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens, temperature=cfg.temperature, greedy=cfg.greedy,
        batch_size=cfg.batch_size, seed=cfg.seed, amp=rt.amp_dtype,
        desc="ifeval")
    seconds = time.perf_counter() - t0
    rep = evaluate_ifeval(rows, responses)
    out = {"data": cfg.data, "model": cfg.model, "decoding": "greedy" if cfg.greedy else f"T = {cfg.temperature}",
           "max_new_tokens": cfg.max_new_tokens, "generation_seconds": seconds} | rep.as_dict()
    out_dir = Path(cfg.output_dir)
    atomic_write_text(out_dir / "ifeval.json", json.dumps(_json_safe(out), indent=2, ensure_ascii=False))
    # the reference harness's input_response_data format, so its own script can cross-check these answers
    write_jsonl(out_dir / "responses.jsonl", ({"key": r.key, "prompt": r.prompt, "response": x}
                                              for r, x in zip(rows, responses)))
    print(format_ifeval(out))
    print(f"[ifeval] wrote {out_dir / 'ifeval.json'} and responses.jsonl")
    return out


def format_ifeval(d: dict) -> str:
    ci = d.get("ci95", {})
    lines = [f"IFEval: {d['n_prompts']} prompts, {d['n_instructions']} instructions ({d['decoding']})"]
    for label, key, cik in (("prompt-level strict", "prompt_level_strict_accuracy", "prompt_strict"),
                            ("instruction-level strict", "instruction_level_strict_accuracy", "instruction_strict"),
                            ("prompt-level loose", "prompt_level_loose_accuracy", "prompt_loose"),
                            ("instruction-level loose", "instruction_level_loose_accuracy", "instruction_loose")):
        lo, hi = ci.get(cik, (float("nan"), float("nan")))
        lines.append(f"  {label:<26} {d[key]:.3f}  [95% CI {lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
