"""Constraint-following tasks with a gold scorer, simulated labelers and IFEval checkers.

* :mod:`~instructrl.tasks.constraints` - checkers, ``gold_score``, ``repair``
* :mod:`~instructrl.tasks.generator` - seeded prompts with constraint specs and user ids
* :mod:`~instructrl.tasks.labelers` - simulated labelers (a stand-in for humans)
* :mod:`~instructrl.tasks.ifeval` - the public IFEval JSONL format and its checkers
"""

from instructrl.tasks.constraints import RepairError, check, gold_score, repair, satisfied, satisfies_all
from instructrl.tasks.generator import (
    ConstraintTask, demonstration_text, generate_tasks, load_tasks, sample_responses, save_tasks, split_by_user,
)

__all__ = [
    "ConstraintTask", "RepairError", "check", "demonstration_text", "generate_tasks", "gold_score", "load_tasks",
    "repair", "sample_responses", "satisfied", "satisfies_all", "save_tasks", "split_by_user",
]
