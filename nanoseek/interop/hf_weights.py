"""Hugging Face tensor names and layouts <-> our state dict, and a streaming safetensors reader.

One table (`plan`) says where each of our tensors lives in a transformers checkpoint and
how it is laid out there; loading reads it one way, export writes it the other way.
Layout differences handled here:

* routed experts: ours are stacked `[E, out, in]`; checkpoints store them per expert
  (`mlp.experts.{e}.gate_proj.weight`, what `save_pretrained` writes by default) or fused
  (`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj [E, D, F]`, transformers
  5.x's in-memory layout, written by `save_pretrained(save_original_format=False)`).
  Both are read; export writes per-expert tensors, which transformers converts on load.
* attention: each variant names its tensors and their layouts (`attention.py`, `hf_tensors`),
  e.g. MLA's rotary rows, stored interleaved by DeepSeek, are permuted once at load time and
  permuted back at export: our attention has no interleaved path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from nanoseek.errors import InputError, missing, read_json
from nanoseek.interop.hf_config import ARCHITECTURES
from nanoseek.model.attention import attention_class
from nanoseek.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


class HFWeightsError(InputError):
    """Checkpoint tensors that do not match the model the config describes."""


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- reading
def _shards(index: Path) -> list[Path]:
    """The shard files an index names, each checked to lie in the index's directory before anything is opened
    (a crafted index could name `../../etc/passwd`)."""
    value = read_json(index, HFWeightsError, expect_object=False)
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise HFWeightsError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file name")
    files = set()
    for shard in weight_map.values():
        # a plain file name (checked as text, not resolved: hub caches link shards to blobs elsewhere)
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise HFWeightsError(f"{index}: shard {shard!r} is not a file in the model directory; refused")
        files.add(index.parent / shard)
    return sorted(files)


def _opened(file: Path):
    """safe_open(file), or one line saying the file is empty, truncated or not safetensors."""
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own errors for every kind of damage
        reason = " ".join(str(e).split()) or type(e).__name__
        raise HFWeightsError(f"{file}: not a readable safetensors file, truncated or corrupt ({reason})") from None


class SafetensorsDir:
    """The tensors of a model directory (one file, or shards with or without an index), read one at a time.

    safetensors maps a file and hands out tensors backed by that mapping; every page read
    stays resident (and counts in our RSS) until the file is closed. The reader therefore
    closes and reopens its handle after every `reopen_bytes` read: on top of the tensors
    the caller keeps, memory grows by at most that budget plus one tensor.
    """

    def __init__(self, directory: str | Path, reopen_bytes: int = 16 << 20) -> None:
        self.directory = Path(directory)
        self.reopen_bytes = reopen_bytes
        index = self.directory / INDEX_FILE
        if index.is_file():
            files = _shards(index)
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise missing(index, f"shard file(s) not found: {_listing(absent)}")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise missing(self.directory, "no *.safetensors weights")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for file in files:
            with _opened(file) as f:
                for name in f.keys():
                    if name in self.file_of:
                        raise HFWeightsError(f"tensor {name} is stored twice ({self.file_of[name].name}, {file.name})")
                    sl = f.get_slice(name)
                    self.file_of[name], self.shape[name], self.dtype[name] = file, tuple(sl.get_shape()), sl.get_dtype()
        self._file: Path | None = None
        self._handle = None
        self._read_since_open = 0

    def names(self) -> set[str]:
        return set(self.file_of)

    def _open(self, file: Path):
        if self._handle is not None and (file != self._file or self._read_since_open >= self.reopen_bytes):
            self.close()
        if self._handle is None:
            self._handle = safe_open(str(file), framework="pt")
            self._handle.__enter__()
            self._file, self._read_since_open = file, 0
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle, self._file = None, None

    def read(self, name: str, index: tuple | None = None) -> Tensor:
        """CPU tensor as stored (possibly backed by the file mapping: copy it, do not keep it)."""
        f = self._open(self.file_of[name])
        t = f.get_tensor(name) if index is None else f.get_slice(name)[index]
        self._read_since_open += t.numel() * t.element_size()
        return t

    def most_common_float_dtype(self) -> torch.dtype:
        """The floating dtype holding the most elements (the checkpoint's working dtype)."""
        counts: dict[str, int] = {}
        for name, dt in self.dtype.items():
            if dt in ("F16", "BF16", "F32", "F64"):
                n = 1
                for s in self.shape[name]:
                    n *= s
                counts[dt] = counts.get(dt, 0) + n
        best = max(counts, key=counts.get) if counts else "F32"
        return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[best]


# ----------------------------------------------------------------------------- the name table


@dataclass
class Link:
    """One of our tensors and where it lives in a transformers checkpoint.

    kind: 'copy' (same tensor), 'rows' (ours = hf[rows], a row permutation), 'experts' (ours[e] <->
    hf[e], one HF tensor per expert), 'fused_gate' / 'fused_up' (first / second half of dim 1 of a
    fused gate_up_proj).
    """

    ours: str
    hf: list[str]
    kind: str = "copy"
    rows: Tensor | None = field(default=None, repr=False)  # 'rows': ours = hf[rows]


@dataclass
class Plan:
    links: list[Link]
    zeros: list[tuple[str, tuple[int, ...]]]  # HF tensors we do not have, which must be (and are written as) zero
    ignorable: re.Pattern  # HF tensors that are fine to skip


def plan(cfg: ModelConfig, arch: str, hf_config: dict, fused_layers: set[int] = frozenset()) -> Plan:
    """Where each of our state-dict tensors lives in a checkpoint of `arch` (fused expert layout for `fused_layers`)."""
    family = ARCHITECTURES[arch]
    attn = attention_class(cfg)
    attn_tensors = attn.hf_tensors(cfg, family, hf_config)
    links = [Link("embed.weight", ["model.embed_tokens.weight"]), Link("norm.weight", ["model.norm.weight"])]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", ["lm_head.weight"]))
    zeros: list[tuple[str, tuple[int, ...]]] = []
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        pairs = [("attn_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight")]
        for t in attn_tensors:
            kind = "copy" if t.rows is None else "rows"
            links.append(Link(o + "attn." + t.ours, [h + "self_attn." + t.theirs], kind, t.rows))
        zeros += [(h + "self_attn." + name, shape) for name, shape in attn.hf_zero_tensors(cfg, family)]
        if cfg.layer_is_moe(i):
            pairs.append(("mlp.router.weight", "mlp.gate.weight"))
            if family == "deepseek_v3":
                pairs.append(("mlp.router.e_score_correction_bias", "mlp.gate.e_score_correction_bias"))
            if cfg.shared_hidden > 0:
                shared = "mlp.shared_experts." if family == "deepseek_v3" else "mlp.shared_expert."
                pairs += [
                    ("mlp.shared.w1.weight", shared + "gate_proj.weight"),
                    ("mlp.shared.w3.weight", shared + "up_proj.weight"),
                    ("mlp.shared.w2.weight", shared + "down_proj.weight"),
                ]
            if cfg.shared_expert_gate:
                pairs.append(("mlp.shared_gate.weight", "mlp.shared_expert_gate.weight"))
            experts = range(cfg.n_routed_experts)
            if i in fused_layers:
                links += [
                    Link(o + "mlp.w1", [h + "mlp.experts.gate_up_proj"], "fused_gate"),
                    Link(o + "mlp.w3", [h + "mlp.experts.gate_up_proj"], "fused_up"),
                    Link(o + "mlp.w2", [h + "mlp.experts.down_proj"]),
                ]
            else:
                for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    names = [f"{h}mlp.experts.{e}.{theirs}.weight" for e in experts]
                    links.append(Link(o + f"mlp.{ours}", names, "experts"))
        else:
            pairs += [
                ("mlp.w1.weight", "mlp.gate_proj.weight"),
                ("mlp.w3.weight", "mlp.up_proj.weight"),
                ("mlp.w2.weight", "mlp.down_proj.weight"),
            ]
        links += [Link(o + ours, [h + theirs]) for ours, theirs in pairs]

    ignore = [r"(^|\.)rotary_emb\.inv_freq$"]  # old checkpoints saved the rotary buffer
    if cfg.tie_embeddings:
        ignore.append(r"^lm_head\.weight$")  # some tied checkpoints store the copy anyway
    if hf_config.get("num_nextn_predict_layers"):
        # DeepSeek-V3's multi-token-prediction module is stored as extra layers; transformers skips it too.
        extra = "|".join(str(cfg.n_layers + j) for j in range(int(hf_config["num_nextn_predict_layers"])))
        ignore.append(rf"^model\.layers\.({extra})\.")
    return Plan(links, zeros, re.compile("|".join(ignore)))


# ----------------------------------------------------------------------------- checks


def expected_hf_shapes(link: Link, our_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    if link.kind == "experts":
        return {name: our_shape[1:] for name in link.hf}
    if link.kind in ("fused_gate", "fused_up"):
        return {link.hf[0]: (our_shape[0], 2 * our_shape[1], our_shape[2])}
    return {link.hf[0]: our_shape}


def check(p: Plan, our_shapes: dict[str, tuple[int, ...]], reader: SafetensorsDir) -> None:
    """Missing / unexpected tensors and shape mismatches, all reported at once, before reading any data."""
    want: dict[str, tuple[int, ...]] = {}
    for link in p.links:
        want.update(expected_hf_shapes(link, our_shapes[link.ours]))
    want.update(dict(p.zeros))
    have = reader.names()
    missing = sorted(set(want) - have)
    unexpected = sorted(
        n for n in have - set(want) if not p.ignorable.search(n) and 0 not in reader.shape[n]
    )  # empty tensors are harmless
    bad_shape = sorted(
        f"{n} {list(reader.shape[n])} (expected {list(s)})"
        for n, s in want.items()
        if n in have and reader.shape[n] != s
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches: {_listing(bad_shape)}")
    if problems:
        raise HFWeightsError(f"{reader.directory}: checkpoint does not match its config.json: " + "; ".join(problems))


def fused_expert_layers(names: set[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$", n))}


# ----------------------------------------------------------------------------- load


def load_tensor(
    link: Link, reader: SafetensorsDir, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Our tensor for `link`, built straight on `device` in `dtype` (one stored tensor in flight at a time)."""
    if link.ours.endswith("e_score_correction_bias"):
        dtype = torch.float32  # a selection-only bias: bf16 would reorder near-tied experts (transformers keeps fp32)
    if link.kind == "experts":
        out = torch.empty(shape, dtype=dtype, device=device)
        for e, name in enumerate(link.hf):
            out[e].copy_(reader.read(name))
        return out
    if link.kind in ("fused_gate", "fused_up"):
        half = shape[1]
        rows = slice(0, half) if link.kind == "fused_gate" else slice(half, 2 * half)
        return reader.read(link.hf[0], (slice(None), rows)).to(device=device, dtype=dtype, copy=True)
    t = reader.read(link.hf[0])
    if link.rows is not None:
        return t[link.rows].to(device=device, dtype=dtype)  # indexing already copies
    return t.to(device=device, dtype=dtype, copy=True)


def check_zeros(p: Plan, reader: SafetensorsDir) -> None:
    nonzero = [name for name, _ in p.zeros if reader.read(name).count_nonzero() > 0]
    if nonzero:
        raise HFWeightsError(
            f"{reader.directory}: attention_bias = true with a non-zero o_proj bias ({_listing(nonzero)}): "
            "nanoseek attention has biases on q, k, v only"
        )


# ----------------------------------------------------------------------------- export


def export_tensors(p: Plan, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(HF name, contiguous CPU tensor) in checkpoint order, one at a time."""
    for link in p.links:
        t = state[link.ours].detach()
        if link.kind == "experts":
            for e, name in enumerate(link.hf):
                yield name, t[e].to("cpu").clone()
        elif link.kind == "copy":
            yield link.hf[0], t.to("cpu").contiguous()
        elif link.kind == "rows":
            inverse = torch.argsort(link.rows)  # hf = ours[inverse] undoes ours = hf[rows]
            yield link.hf[0], t.to("cpu")[inverse].contiguous()
        else:
            raise ValueError(f"cannot export a {link.kind!r} link")  # export always writes per-expert tensors
    for name, shape in p.zeros:
        yield name, torch.zeros(shape, dtype=state["embed.weight"].dtype)
