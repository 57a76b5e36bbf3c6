"""The training stages: SFT, the reward model, PPO/RLOO. Each loop reads top to bottom."""
