"""Measure simulated-labeler agreement against the noise level (pure Python, ~10 s).

Two different training labelers rank each of N sample_responses() sets (K = 4..9);
agreement = share of response pairs ordered the same way (InstructGPT: 72.6%).
Usage: python benchmarks/labeler_agreement.py [--tasks 400] [--seeds 3]
"""

import argparse
import random
import time

from instructrl.tasks.generator import generate_tasks, sample_responses
from instructrl.tasks.labelers import DEFAULT_NOISE, LabelerPool


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, nargs="*", default=[0.12, 0.15, DEFAULT_NOISE, 0.18, 0.22])
    args = ap.parse_args()
    t0 = time.time()
    print(f"default noise = {DEFAULT_NOISE}")
    print("noise   kind      seed  agreement  95% CI          pairs")
    for noise in args.noise:
        for kind in ("gaussian", "gumbel"):
            for seed in range(args.seeds):
                tasks = generate_tasks(args.tasks, seed=100 + seed)
                rng = random.Random(seed)
                sets = [sample_responses(t, rng.randint(4, 9), rng) for t in tasks]
                a = LabelerPool.default(noise=noise, noise_kind=kind, seed=seed).measure_agreement(tasks, sets, rng)
                print(f"{noise:<7.3f} {kind:<9} {seed:<5} {a.rate:<10.4f} [{a.lo:.3f}, {a.hi:.3f}]  {a.n_pairs}")
    print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
