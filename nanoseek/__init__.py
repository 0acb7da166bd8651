"""nanoseek: the DeepSeek recipe (MoE transformer + RL on verifiable rewards) in small, readable PyTorch."""

__version__ = "0.1.0"
