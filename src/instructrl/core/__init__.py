"""Pure math, torch only: losses, RL estimators, statistics, tensor helpers. Imports nothing else of instructrl."""
