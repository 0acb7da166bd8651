"""The model: config and presets, the transformer (GQA or MLA attention), the DeepSeekMoE layer."""

from nanoseek.model.config import PRESETS, ModelConfig, get_preset, preset_names
from nanoseek.model.io import load_model, save_model
from nanoseek.model.moe import install_balancing_hook, router_stats, update_router_biases
from nanoseek.model.transformer import KVCache, Transformer

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "get_preset",
    "install_balancing_hook",
    "load_model",
    "preset_names",
    "router_stats",
    "save_model",
    "update_router_biases",
]
