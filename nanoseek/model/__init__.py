"""The model: config and presets, the attention variants (GQA, MLA), the transformer, the DeepSeekMoE layer."""

from nanoseek.model.attention import ATTENTIONS, AttentionCache
from nanoseek.model.config import PRESETS, ModelConfig, get_preset, preset_names
from nanoseek.model.io import load_model, save_model
from nanoseek.model.moe import install_balancing_hook, router_stats, update_router_biases
from nanoseek.model.transformer import Transformer

__all__ = [
    "ATTENTIONS",
    "PRESETS",
    "AttentionCache",
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
