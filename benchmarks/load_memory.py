"""Peak CPU memory of `load_hf_model`: does loading hold the weights only once?

    python benchmarks/load_memory.py --mb 400            # a generated ~400 MB Llama-shaped checkpoint
    python benchmarks/load_memory.py --mb 400 --shard-mb 100 --dtype bfloat16

Writes a random Hugging Face checkpoint (config.json + safetensors, no transformers needed),
then loads it in a fresh subprocess and reports the increase of that process's peak RSS
(which includes the file pages mapped by safetensors) over its baseline after imports,
relative to the size of the loaded weights. The peak is VmHWM from /proc (ru_maxrss would
carry the parent's peak across fork/exec).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch
import nanoseek.interop.hf as hf
from nanoseek.model import ModelConfig, Transformer


def status(key):  # kB from /proc/self/status; VmHWM is this process's peak RSS (file-mapped pages included)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


torch.set_num_threads(1)
# The first meta-device build costs ~67 MB of one-time torch set-up whatever the model size;
# pay it before the baseline so that the measurement is about the weights.
with torch.device("meta"):
    Transformer(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=8))
dtype = getattr(torch, sys.argv[2])
base = status("VmHWM")
t = time.perf_counter()
model = hf.load_hf_model(sys.argv[1], device="cpu", dtype=dtype)
seconds = time.perf_counter() - t
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"weights_mb": weights / 2**20, "peak_increase_mb": (peak - base) / 2**10,
                  "ratio": (peak - base) * 1024 / weights, "load_s": seconds}))
"""


def write_checkpoint(directory: Path, target_mb: float, shard_mb: float, dtype: str) -> None:
    """A Llama-shaped random checkpoint of about `target_mb` MB, sharded by `shard_mb` with an index."""
    import torch
    from safetensors.torch import save_file

    d, layers, vocab = 1024, 0, 8192
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_layer = (4 * d * d + 3 * d * 2816 + 2 * d) * element
    fixed = 2 * vocab * d * element + d * element
    layers = max(1, round((target_mb * 2**20 - fixed) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))

    def tensors():
        yield "model.embed_tokens.weight", (vocab, d)
        for i in range(layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{n}.weight", (d, d)
            yield p + "mlp.gate_proj.weight", (2816, d)
            yield p + "mlp.up_proj.weight", (2816, d)
            yield p + "mlp.down_proj.weight", (d, 2816)
            yield p + "input_layernorm.weight", (d,)
            yield p + "post_attention_layernorm.weight", (d,)
        yield "model.norm.weight", (d,)
        yield "lm_head.weight", (vocab, d)

    shards, shard, size, weight_map = [], {}, 0, {}
    for name, shape in tensors():
        t = torch.full(shape, 0.02, dtype=getattr(torch, dtype))  # values do not matter, pages do
        if shard and size + t.numel() * element > shard_mb * 2**20:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * element
    shards.append(shard)
    for k, s in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(s, fname))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(directory: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(directory), dtype], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=400, help="checkpoint size to generate (MB)")
    p.add_argument("--shard-mb", type=float, default=1e9, help="shard size (MB; default: one file)")
    p.add_argument("--dtype", default="float32", help="stored and loaded dtype")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp) / "ckpt"
        write_checkpoint(directory, args.mb, args.shard_mb, args.dtype)
        result = measure(directory, args.dtype)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"weights {result['weights_mb']:.0f} MB, peak RSS increase {result['peak_increase_mb']:.0f} MB "
            f"= {result['ratio']:.2f}x the weights, load {result['load_s']:.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
