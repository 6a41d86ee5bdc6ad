"""Training and evaluation helpers: losses, optimisation, rewards, metrics, checkpoints."""
