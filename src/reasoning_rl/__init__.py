"""reasoning-rl: Expert Iteration, PPO and RCRL for LLM reasoning (Havrilla et al., 2024) as one Hydra app."""
