"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapters(model, "runs/rl/checkpoints/step_200")       # what a LoRA run's checkpoints hold
    model = load_adapters(base_model, "path/to/adapter")          # apply and fill the adapters of a directory

    from peft import PeftModel                                    # the same directory, read by peft
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported_base), "path/to/adapter")

Tensor names are PEFT's, `base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight`
([out, r]), for the module names of the transformers architecture the model exports to (`interop.hf`):
`model.layers.0.self_attn.q_proj`, and per routed expert `model.layers.1.mlp.experts.3.gate_proj`.
A model with no transformers counterpart (the sigmoid-routed MoE presets) keeps its own module names
(`layers.0.attn.wq`; routed experts stacked: `layers.1.mlp.w1.lora_A.weight` [E, r, in]); the file's
metadata says which (`nanoseek_names`), and which of our targets made it (`nanoseek_targets`).
`base_model_name_or_path` is the base model's directory; `nanoseek.loading` loads it under the adapters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from nanoseek.errors import InputError, missing, read_json
from nanoseek.interop.hf_config import HFConfigError, model_config_to_hf_config, pick_architecture
from nanoseek.interop.hf_weights import Link, plan
from nanoseek.model.io import atomic_write
from nanoseek.model.lora import adapter_key, apply_lora, lora_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class _Entry:
    """One PEFT tensor: which of ours it is (`expert`: one slice of a stacked one; `rows`: ours = theirs[rows])."""

    peft: str
    ours: str
    expert: int | None = None
    rows: Tensor | None = None


def _links(model: nn.Module) -> dict[str, Link] | None:
    """Our base weight name -> its place in the transformers checkpoint, or None when the model exports to none."""
    try:
        arch = pick_architecture(model.cfg)
    except HFConfigError:
        return None
    return {link.ours: link for link in plan(model.cfg, arch, model_config_to_hf_config(model.cfg)).links}


def _layout(model: nn.Module, base_names: list[str], links: dict[str, Link] | None) -> list[_Entry]:
    """The PEFT tensors of the adapters on `base_names`, in order."""
    entries = []
    for name in base_names:
        for which, peft_which in (("a", "lora_A"), ("b", "lora_B")):
            ours = adapter_key(name, which)
            if links is None:
                entries.append(_Entry(f"{_PREFIX}{name.removesuffix('.weight')}.{peft_which}.weight", ours))
                continue
            link = links[name]
            modules = [hf.removesuffix(".weight") for hf in link.hf]
            if link.kind == "experts":
                entries += [_Entry(f"{_PREFIX}{m}.{peft_which}.weight", ours, e) for e, m in enumerate(modules)]
            else:  # B's rows follow the weight's rows (MLA's rotary permutation); A is [r, in] either way
                rows = link.rows if which == "b" else None
                entries.append(_Entry(f"{_PREFIX}{modules[0]}.{peft_which}.weight", ours, rows=rows))
    return entries


def _module_names(entries: list[_Entry]) -> list[str]:
    return sorted({e.peft.removeprefix(_PREFIX).rsplit(".", 2)[0].rpartition(".")[2] for e in entries})


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapters (float32) as a PEFT adapter directory; returns it."""
    adapters = lora_of(model)
    if adapters is None:
        raise ValueError("the model has no adapters")
    directory = Path(directory)
    links = _links(model)
    entries = _layout(model, adapters.names, links)
    state = model.state_dict()
    tensors = {}
    for e in entries:
        t = state[e.ours].detach().float().cpu()
        if e.expert is not None:
            t = t[e.expert]
        if e.rows is not None:
            t = t[torch.argsort(e.rows)]  # theirs = ours[inverse] undoes ours = theirs[rows]
        tensors[e.peft] = t.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapters.base,
        "r": adapters.rank,
        "lora_alpha": adapters.alpha,
        "lora_dropout": adapters.dropout,
        "target_modules": _module_names(entries),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    metadata = {
        "format": "pt",
        "nanoseek_names": "hf" if links else "nanoseek",
        "nanoseek_targets": ",".join(adapters.targets),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(directory / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter directory (one line naming the file when it is not one)."""
    path = Path(directory) / ADAPTER_CONFIG
    config = read_json(path, InputError)
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(config.get("r"), int):
        raise InputError(f"{path}: not a LoRA adapter config (peft_type LORA with an integer r)")
    if config.get("use_rslora") or config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
        raise InputError(f"{path}: use_rslora, fan_in_fan_out and adapter biases are not supported")
    return config


def _our_targets(model: nn.Module, config: dict, metadata: dict[str, str], where: Path) -> list[str]:
    """Our target names: from the file's metadata, else (an adapter made by peft) from target_modules."""
    if metadata.get("nanoseek_targets"):
        return metadata["nanoseek_targets"].split(",")
    modules = config.get("target_modules") or []
    ours_of: dict[str, set[str]] = {}  # transformers module name -> our attribute names (q_proj -> wq)
    for name, link in (_links(model) or {}).items():
        theirs = link.hf[0].removesuffix(".weight").rpartition(".")[2]
        ours_of.setdefault(theirs, set()).add(name.removesuffix(".weight").rpartition(".")[2])
    if isinstance(modules, str) or not modules or any(m not in ours_of for m in modules):
        raise InputError(f"{where}: target_modules {modules!r} name no projection of the base model")
    return sorted(set().union(*(ours_of[m] for m in modules)))


def read_adapters(directory: str | Path) -> tuple[dict, dict[str, str], dict[str, Tensor]]:
    """(adapter_config.json, the weights file's metadata, its tensors) of a PEFT LoRA directory."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise missing(directory, f"no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return config, f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own errors for every kind of damage
        raise InputError(f"{weights}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def fill_adapters(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapters stored in `directory` into the model's (made by the same targets and rank)."""
    directory = Path(directory)
    _, metadata, stored = read_adapters(directory)
    _fill(model, stored, metadata, directory)


def _fill(model: nn.Module, stored: dict[str, Tensor], metadata: dict[str, str], directory: Path) -> None:
    links = None if metadata.get("nanoseek_names") == "nanoseek" else _links(model)
    entries = _layout(model, lora_of(model).names, links)
    want = {e.peft for e in entries}
    absent, extra = sorted(want - stored.keys()), sorted(stored.keys() - want)
    if absent or extra:
        raise InputError(
            f"{directory}: the adapters do not fit this base model: missing {absent[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for e in entries:
            target = model.get_parameter(e.ours)
            target = target[e.expert] if e.expert is not None else target
            t = stored[e.peft]
            if e.rows is not None:
                t = t[e.rows]
            if tuple(t.shape) != tuple(target.shape):
                raise InputError(
                    f"{directory}: the adapters do not fit this base model: {e.peft} has shape {list(t.shape)}, "
                    f"the model's is {list(target.shape)}"
                )
            target.copy_(t)


def load_adapters(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Apply the adapters of a PEFT LoRA directory to `model` (frozen) and fill them; returns the model.

    Raises InputError naming the directory when the adapters do not fit the model (another base)."""
    directory = Path(directory)
    config, metadata, stored = read_adapters(directory)
    targets = _our_targets(model, config, metadata, directory)
    try:
        apply_lora(
            model,
            config["r"],
            float(config.get("lora_alpha", config["r"])),
            targets,
            float(config.get("lora_dropout", 0.0)),
            base=str(config.get("base_model_name_or_path") or ""),
            dtype=dtype or model.embed.weight.dtype,
        )
    except InputError as e:
        raise InputError(f"{directory}: the adapters do not fit this base model: {e}") from None
    _fill(model, stored, metadata, directory)
    return model
