"""Hugging Face `config.json` <-> `ModelConfig`, for the architectures nanoseek can express exactly.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen2MoeForCausalLM,
Qwen3MoeForCausalLM, DeepseekV3ForCausalLM. Anything a `ModelConfig` cannot reproduce
(sliding windows, partial rotary, longrope, biased MLPs, MoE layer patterns other than
"the first k layers are dense", quantized weights, ...) is refused with an error that
names the offending field, rather than loaded into a model that computes something else.

Conventions (what transformers does when a field is absent): behaviour flags fall back to
the transformers class default; size fields are required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanoseek.errors import InputError, missing, read_json
from nanoseek.model.attention import attention_class, attention_for_hf_family
from nanoseek.model.config import ModelConfig

# architecture -> model_type
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_REQUIRED = object()


class HFConfigError(InputError):
    """A Hugging Face config that nanoseek cannot load faithfully."""


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise missing(directory, "no config.json (not a Hugging Face model directory)")
    return read_json(path, HFConfigError)


def architecture_of(hf: dict[str, Any]) -> str:
    """The one supported architecture named by `architectures` (or, failing that, `model_type`)."""
    archs = hf.get("architectures") or []
    if archs:
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise HFConfigError(
                f"unsupported architecture {', '.join(map(repr, archs))} (config.json 'architectures'); "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        return known[0]
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFConfigError(
            f"unsupported model_type {model_type!r} (config.json has no 'architectures'); "
            f"supported: {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def _field(hf: dict[str, Any], name: str, default: Any = _REQUIRED, nullable: bool = False) -> Any:
    value = hf.get(name, default)
    if value is _REQUIRED or (value is None and not nullable):
        raise HFConfigError(f"config.json: missing required field {name!r}")
    return value


def _refuse(name: str, value: Any, why: str) -> HFConfigError:
    return HFConfigError(f"config.json: {name} = {value!r} is not supported: {why}")


class _Fields(dict):
    """config.json as the attention variants read it (`attention.HFFields`): errors name the field."""

    def required(self, name: str, nullable: bool = False) -> Any:
        return _field(self, name, nullable=nullable)

    def refuse(self, name: str, value: Any, why: str) -> HFConfigError:
        return _refuse(name, value, why)


def _rope(hf: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling dict or None) from transformers 5.x `rope_parameters` or 4.x fields.

    Like transformers, a legacy `rope_scaling` dict wins over `rope_parameters`, and the
    implicit lengths are written out explicitly so that our config does not depend on
    `max_seq_len` (which users may change) for its frequencies.
    """
    legacy = hf.get("rope_scaling")
    field = "rope_scaling" if legacy else "rope_parameters"
    params = dict(legacy or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise _refuse(field, params, "per-layer-type RoPE parameters")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _refuse("partial_rotary_factor", partial, "rotary embedding on part of the head only")
    if kind not in ROPE_TYPES:
        raise _refuse(f"{field}.rope_type", kind, f"supported rope types are {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    scaling: dict[str, Any] = {"rope_type": kind, **params}
    if kind == "dynamic":
        # transformers' dynamic NTK measures the sequence against max_position_embeddings.
        scaling["original_max_position_embeddings"] = max_pos
    if kind in ("yarn", "llama3"):
        original = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(original or max_pos)
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    needed = {
        "linear": ["factor"],
        "dynamic": ["factor"],
        "yarn": ["factor"],
        "llama3": ["factor", "low_freq_factor", "high_freq_factor"],
    }[kind]
    for name in needed:
        if scaling.get(name) is None:
            raise HFConfigError(f"config.json: {field}.{name} is required for rope_type {kind!r}")
    return theta, scaling


def _moe_suffix(hf: dict[str, Any], n_layers: int) -> int:
    """first_k_dense for Qwen-MoE's (decoder_sparse_step, mlp_only_layers), or an error naming them."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    moe = [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]
    k = moe[0] if moe else n_layers
    if moe != list(range(k, n_layers)):
        name = "decoder_sparse_step" if step != 1 else "mlp_only_layers"
        raise _refuse(
            name,
            step if step != 1 else sorted(only),
            f"MoE layers {moe} are not a suffix of the {n_layers} layers (nanoseek models have "
            "dense layers first, then MoE layers: first_k_dense)",
        )
    return k


def hf_config_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a `ModelConfig` (errors name the refused field)."""
    arch = architecture_of(hf)
    family = ARCHITECTURES[arch]
    if hf.get("quantization_config"):
        raise _refuse(
            "quantization_config",
            hf["quantization_config"].get("quant_method", "?"),
            "quantized checkpoints (dequantize to bf16 first)",
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "nanoseek MLPs are SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise _refuse("mlp_bias", True, "nanoseek MLPs have no bias")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise _refuse("layer_types", hf["layer_types"], "only full attention (no sliding window)")
    if hf.get("use_sliding_window") and hf.get("sliding_window") and not hf.get("layer_types"):
        raise _refuse("use_sliding_window", True, "only full attention (no sliding window)")

    n_layers = int(_field(hf, "num_hidden_layers"))
    max_pos = int(_field(hf, "max_position_embeddings"))
    theta, scaling = _rope(hf, max_pos)
    attn_type, attn = attention_for_hf_family(family)
    c: dict[str, Any] = dict(
        vocab_size=int(_field(hf, "vocab_size")),
        d_model=int(_field(hf, "hidden_size")),
        n_layers=n_layers,
        n_heads=int(_field(hf, "num_attention_heads")),
        d_ff=int(_field(hf, "intermediate_size")),
        max_seq_len=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attn_type=attn_type,
        **attn.config_from_hf(_Fields(hf), family),
    )
    if family == "deepseek_v3":
        c.update(_deepseek_moe(hf, n_layers))
    elif family in ("qwen2_moe", "qwen3_moe"):
        c.update(_qwen_moe(hf, family, n_layers))
    return ModelConfig(**c)


def _deepseek_moe(hf: dict[str, Any], n_layers: int) -> dict[str, Any]:
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise _refuse("scoring_func", scoring, "transformers' DeepseekV3 router is sigmoid")
    method = hf.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise _refuse("topk_method", method, "transformers' DeepseekV3 routes with noaux_tc")
    if hf.get("moe_layer_freq", 1) != 1:
        raise _refuse("moe_layer_freq", hf["moe_layer_freq"], "every layer after first_k_dense_replace is MoE")
    first_dense = int(hf.get("first_k_dense_replace", 3) or 0)
    n_experts = int(_field(hf, "n_routed_experts"))
    if first_dense >= n_layers or n_experts == 0:
        return {}
    n_groups, topk_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if n_experts % n_groups or n_experts // n_groups < 2:
        raise _refuse(
            "n_group",
            n_groups,
            "transformers ranks each group by its best two experts, so "
            "n_routed_experts / n_group must be an integer >= 2",
        )
    return dict(
        n_routed_experts=n_experts,
        n_shared_experts=int(hf.get("n_shared_experts", 1) or 0),
        moe_d_ff=int(_field(hf, "moe_intermediate_size")),
        top_k=int(_field(hf, "num_experts_per_tok")),
        score_func="sigmoid",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_groups=n_groups,
        topk_groups=topk_groups,
        first_k_dense=first_dense,
    )


def _qwen_moe(hf: dict[str, Any], family: str, n_layers: int) -> dict[str, Any]:
    n_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    first_dense = _moe_suffix(hf, n_layers) if n_experts > 0 else n_layers
    if n_experts == 0 or first_dense >= n_layers:
        return {}
    c: dict[str, Any] = dict(
        n_routed_experts=n_experts,
        moe_d_ff=int(_field(hf, "moe_intermediate_size")),
        top_k=int(_field(hf, "num_experts_per_tok")),
        score_func="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=1.0,
        first_k_dense=first_dense,
    )
    if family == "qwen2_moe":
        shared = int(_field(hf, "shared_expert_intermediate_size"))
        if shared <= 0:
            raise _refuse("shared_expert_intermediate_size", shared, "Qwen2-MoE always has a shared expert")
        c.update(n_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
    return c


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        params.update(cfg.rope_scaling)
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
        if params["rope_type"] == "dynamic":
            # transformers measures dynamic NTK against max_position_embeddings (set by the caller).
            params.pop("original_max_position_embeddings", None)
    return params


def _dynamic_max_pos(cfg: ModelConfig) -> int:
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "dynamic":
        return int(rs.get("original_max_position_embeddings") or cfg.max_seq_len)
    return cfg.max_seq_len


def _mlp_mismatch(cfg: ModelConfig, family: str) -> str | None:
    """Why `family`'s MLP layers (dense, or its kind of MoE) cannot compute `cfg`'s, or None."""
    if family in ("llama", "qwen2", "qwen3"):
        return "dense only (the model has MoE layers)" if cfg.is_moe else None
    if family == "deepseek_v3":
        if not cfg.is_moe:
            return None
        if cfg.score_func != "sigmoid":
            return "DeepseekV3 routes with sigmoid scores (score_func='softmax' given)"
        if cfg.shared_expert_gate:
            return "DeepseekV3 has no shared_expert_gate"
        if cfg.shared_hidden % cfg.moe_d_ff:
            return f"DeepseekV3's shared experts are n x moe_d_ff wide (shared width {cfg.shared_hidden})"
        if cfg.n_routed_experts // cfg.n_groups < 2:
            return "DeepseekV3 needs >= 2 experts per group"
        return None
    if not cfg.is_moe:
        return "MoE only (the model is dense)"
    if cfg.score_func != "softmax" or cfg.n_groups != 1 or cfg.routed_scaling_factor != 1.0:
        return (
            "Qwen-MoE routers are plain softmax top-k (score_func='softmax', n_groups=1, routed_scaling_factor=1); "
            "sigmoid/grouped GQA-MoE has no transformers counterpart"
        )
    if family == "qwen3_moe" and cfg.shared_hidden > 0:
        return "Qwen3-MoE has no shared expert"
    if family == "qwen2_moe" and not (cfg.shared_hidden > 0 and cfg.shared_expert_gate):
        return "Qwen2-MoE has one sigmoid-gated shared expert"
    return None


def pick_architecture(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what `cfg` computes, or an error saying why none does.

    The candidates are the families of the model's attention variant, in its order of preference."""
    attn = attention_class(cfg)
    why_not = []
    for family in attn.hf_families:
        why = attn.hf_mismatch(cfg, family) or _mlp_mismatch(cfg, family)
        if why is None:
            return MODEL_TYPES[family]
        why_not.append(f"{MODEL_TYPES[family]}: {why}")
    reasons = "; ".join(why_not) or f"attention {cfg.attn_type!r} has no transformers counterpart"
    raise HFConfigError(f"no transformers architecture matches this model: {reasons}")


def model_config_to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A transformers 5.x config.json dict for `cfg` (see `pick_architecture`)."""
    arch = pick_architecture(cfg)
    family = ARCHITECTURES[arch]
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": _dynamic_max_pos(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        **attention_class(cfg).config_to_hf(cfg, family),
    }
    if family == "deepseek_v3":
        moe = cfg.is_moe
        hf.update(
            num_nextn_predict_layers=0,
            first_k_dense_replace=cfg.first_k_dense if moe else cfg.n_layers,
            n_routed_experts=cfg.n_routed_experts if moe else 2,
            n_shared_experts=cfg.shared_hidden // cfg.moe_d_ff if moe else 0,
            moe_intermediate_size=cfg.moe_d_ff,
            num_experts_per_tok=cfg.top_k if moe else 1,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_groups if moe else 1,
            topk_group=cfg.topk_groups if moe else 1,
        )
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("qwen2_moe", "qwen3_moe"):
        hf.update(
            num_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.top_k,
            moe_intermediate_size=cfg.moe_d_ff,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.first_k_dense)),
        )
        if family == "qwen2_moe":
            hf["shared_expert_intermediate_size"] = cfg.shared_hidden
    if family.startswith("qwen"):
        hf["use_sliding_window"] = False
    return hf
