"""Training: the one loop (pretraining, SFT, and the update step of RL), optimizers, checkpoints."""
