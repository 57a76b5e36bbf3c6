"""Simulated labelers: a programmatic STAND-IN for the human labeling team.

Nothing here is human feedback. Each simulated labeler judges a response by
its gold score (:func:`instructrl.tasks.constraints.gold_score`) plus its own
bias (a preference for longer or shorter answers) plus random noise, and ranks
K responses by that noisy utility - a Thurstone (Gaussian noise) or, optionally,
Plackett-Luce (Gumbel noise) choice model. The default noise is calibrated so
that two labelers agree on about 73% of pairwise comparisons on realistic
response sets, as InstructGPT measured for its training labelers
(72.6 ± 1.5%, Ouyang et al. 2022 §3.4 / App. B.3). Some labelers are held out
(never used for training data) and judge evaluation comparisons, as in the
paper (§4: held-out labelers). See docs/simulated-labelers.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

from instructrl.data import Demonstration, Ranking
from instructrl.core.stats import Agreement, pairwise_agreement
from instructrl.tasks.constraints import RepairError, gold_score, repair
from instructrl.tasks.generator import ConstraintTask
from instructrl.tasks.text import count_words

# Std of the Gaussian noise added to the gold score (gold is in [0, 1]). Calibrated
# with benchmarks/labeler_agreement.py so that two labelers of the default pool
# agree on ~73% of comparisons among sample_responses() sets (K = 4..9);
# tests/test_labelers.py checks the band 0.68-0.78.
DEFAULT_NOISE = 0.165
LENGTH_REF_WORDS = 100.0  # the length bias is per 100 words


@dataclass
class SimulatedLabeler:
    """One simulated labeler (a stand-in for a human contractor).

    utility(response) = gold_score + length_bias * min(words, 300) / 100 + noise * ε,
    ε ~ N(0, 1) ("gaussian", Thurstone case V) or standard Gumbel centred at 0
    ("gumbel", which makes the ranking a Plackett-Luce draw).
    """

    id: str
    noise: float = DEFAULT_NOISE
    length_bias: float = 0.0
    heldout: bool = False
    noise_kind: str = "gaussian"

    def __post_init__(self):
        if self.noise < 0:
            raise ValueError(f"labeler {self.id}: noise must be >= 0, got {self.noise}")
        if self.noise_kind not in ("gaussian", "gumbel"):
            raise ValueError(f"labeler {self.id}: noise_kind must be 'gaussian' or 'gumbel', got {self.noise_kind!r}")

    def _eps(self, rng: random.Random) -> float:
        if self.noise_kind == "gaussian":
            return rng.gauss(0.0, 1.0)
        # Gumbel scaled to unit variance (std of standard Gumbel = π/√6), centred.
        g = -math.log(-math.log(rng.random() or 1e-300))
        return (g - 0.5772156649) / (math.pi / math.sqrt(6))

    def mean_utility(self, task: ConstraintTask, response: str) -> float:
        """The noise-free part: gold score plus this labeler's length bias."""
        n = min(count_words(response), 3 * LENGTH_REF_WORDS)
        return gold_score(task.constraints, response, task.topic_words) + self.length_bias * n / LENGTH_REF_WORDS

    def utility(self, task: ConstraintTask, response: str, rng: random.Random) -> float:
        return self.mean_utility(task, response) + self.noise * self._eps(rng)

    def rank(self, task: ConstraintTask, responses: Sequence[str], rng: random.Random, id: str | None = None) -> Ranking:
        """Rank K responses best -> worst by noisy utility (InstructGPT §3.4: rank K = 4..9 outputs).

        Exact duplicates are merged and whitespace-only responses left out
        (identical responses give no comparison, and the rankings format has no
        empty responses); raises ValueError if fewer than 2 distinct remain.
        """
        uniq = list(dict.fromkeys(r for r in responses if r.strip()))
        if len(uniq) < 2:
            raise ValueError(f"task {task.id}: need at least 2 distinct non-empty responses to rank, got {len(uniq)}")
        scored = sorted(uniq, key=lambda r: -self.utility(task, r, rng))
        return Ranking(id or task.id, [{"role": "user", "content": task.prompt}], scored, list(range(len(scored))),
                       self.id, task.user_id or None)

    def prefers(self, task: ConstraintTask, a: str, b: str, rng: random.Random) -> float:
        """1.0 if ``a`` is preferred, 0.0 if ``b``, 0.5 for identical responses."""
        if a == b:
            return 0.5
        return 1.0 if self.utility(task, a, rng) > self.utility(task, b, rng) else 0.0

    def write_demonstration(self, task: ConstraintTask, drafts: Sequence[str] = (), rng: random.Random | None = None,
                            id: str | None = None, max_words: int | None = None) -> Demonstration:
        """A demonstration that passes every constraint.

        Best-of-N: each draft (e.g. samples from the base model) is repaired
        by the constraint rules and the labeler keeps the one it likes best
        (noisy utility; noise-free without ``rng``). With no drafts the
        answer is written from on-topic template sentences. ``max_words`` is
        the response budget the labeler writes to (see ``repair``).
        """
        cands = []
        for d in list(drafts) or [""]:
            try:
                cands.append(repair(task.constraints, d, task.topic, max_words=max_words))
            except RepairError:
                continue
        if not cands:
            cands.append(repair(task.constraints, "", task.topic, max_words=max_words))
        score = (lambda r: self.utility(task, r, rng)) if rng is not None else (lambda r: self.mean_utility(task, r))
        best = max(cands, key=score)
        return Demonstration(id or task.id, [{"role": "user", "content": task.prompt}], best, task.user_id or None,
                             self.id)


class LabelerPool:
    """Training labelers (write demonstrations, rank samples) and held-out labelers (judge evaluations)."""

    def __init__(self, labelers: Sequence[SimulatedLabeler]):
        ids = [l.id for l in labelers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"labeler ids must be unique, got {ids}")
        self.labelers = list(labelers)
        if not self.train:
            raise ValueError("the pool needs at least one training (not held-out) labeler")

    @classmethod
    def default(cls, n_train: int = 6, n_heldout: int = 3, seed: int = 0, noise: float = DEFAULT_NOISE,
                noise_kind: str = "gaussian") -> "LabelerPool":
        """A seeded pool: noise levels spread ±20% around ``noise``; length
        biases ~ N(0, 0.03) per 100 words (a mild taste for longer or shorter answers)."""
        rng = random.Random(seed)
        out = []
        for i in range(n_train + n_heldout):
            held = i >= n_train
            out.append(SimulatedLabeler(
                f"{'heldout' if held else 'labeler'}-{i if not held else i - n_train:02d}",
                noise=noise * rng.uniform(0.8, 1.2), length_bias=rng.gauss(0.0, 0.03), heldout=held,
                noise_kind=noise_kind,
            ))
        return cls(out)

    @property
    def train(self) -> list[SimulatedLabeler]:
        return [l for l in self.labelers if not l.heldout]

    @property
    def heldout(self) -> list[SimulatedLabeler]:
        return [l for l in self.labelers if l.heldout]

    def get(self, labeler_id: str) -> SimulatedLabeler:
        for l in self.labelers:
            if l.id == labeler_id:
                return l
        raise KeyError(f"no labeler {labeler_id!r}; known: {[l.id for l in self.labelers]}")

    def pick(self, rng: random.Random, heldout: bool = False) -> SimulatedLabeler:
        group = self.heldout if heldout else self.train
        if not group:
            raise ValueError("the pool has no held-out labelers" if heldout else "the pool has no training labelers")
        return rng.choice(group)

    def rank(self, task: ConstraintTask, responses: Sequence[str], rng: random.Random) -> Ranking:
        """A ranking by a randomly chosen training labeler."""
        return self.pick(rng).rank(task, responses, rng)

    def write_demonstration(self, task: ConstraintTask, drafts: Sequence[str], rng: random.Random,
                            max_words: int | None = None) -> Demonstration:
        return self.pick(rng).write_demonstration(task, drafts, rng, max_words=max_words)

    def prefers(self, task: ConstraintTask, a: str, b: str, rng: random.Random) -> float:
        """Evaluation judgment by a randomly chosen HELD-OUT labeler: 1 (a), 0 (b), 0.5 (identical)."""
        return self.pick(rng, heldout=True).prefers(task, a, b, rng)

    def measure_agreement(self, tasks: Sequence[ConstraintTask], response_sets: Sequence[Sequence[str]],
                          rng: random.Random, heldout: bool = False) -> Agreement:
        """Inter-labeler agreement: two different labelers rank each response set.

        Returns :func:`instructrl.core.stats.pairwise_agreement` over every pair of
        responses of every set (InstructGPT App. B.3 measured agreement the
        same way, on comparisons labelled by two labelers).
        """
        group = self.heldout if heldout else self.train
        if len(group) < 2:
            raise ValueError("agreement needs at least two labelers in the group")
        rankings = []
        for task, rs in zip(tasks, response_sets):
            a, b = rng.sample(group, 2)
            rankings += [a.rank(task, rs, rng), b.rank(task, rs, rng)]
        return pairwise_agreement(ranking_labels(rankings))


def ranking_labels(rankings: Iterable[Ranking]) -> list[tuple[Hashable, Hashable, Hashable]]:
    """(item, labeler, label) triples for :func:`instructrl.core.stats.pairwise_agreement`.

    item = (ranking id, response x, response y) with x < y as strings, so that
    two labelers' rankings of the same responses share items; label = 1 if x
    was ranked above y, 0 if below, 0.5 if tied.
    """
    out = []
    for r in rankings:
        pos = dict(zip(r.responses, r.ranks))
        resp = sorted(pos)
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                x, y = resp[i], resp[j]
                lab = 0.5 if pos[x] == pos[y] else (1.0 if pos[x] < pos[y] else 0.0)
                out.append(((r.id, x, y), r.labeler_id, lab))
    return out
