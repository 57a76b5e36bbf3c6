"""Evaluation: metrics, policy comparison, reward-model evaluation, the HTML report, IFEval."""
