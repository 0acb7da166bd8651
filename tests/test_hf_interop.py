"""Hugging Face interop: tiny random transformers models of every supported architecture,
built offline from a config, loaded into nanoseek and compared with transformers itself."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from nanoseek.interop.hf import (  # noqa: E402
    HFConfigError,
    HFWeightsError,
    hf_config_to_model_config,
    load_hf_model,
    save_hf,
)
from nanoseek.model import Transformer, load_model  # noqa: E402
from nanoseek.model.rope import dynamic_inv_freq, rope_frequencies  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
DEEPSEEK = dict(
    COMMON,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    routed_scaling_factor=2.5,
    **MOE,
)

CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(COMMON)),
    "qwen2": ("qwen2", dict(COMMON, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(COMMON, head_dim=24)),  # head_dim != hidden / heads
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            COMMON, num_experts=8, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0], **MOE
        ),
    ),
    "qwen3_moe": ("qwen3_moe", dict(COMMON, num_experts=8, norm_topk_prob=True, decoder_sparse_step=2, **MOE)),
    "deepseek_v3": ("deepseek_v3", dict(DEEPSEEK, q_lora_rank=32)),
    "deepseek_v3_no_q_lora": (
        "deepseek_v3",
        dict(
            DEEPSEEK,
            q_lora_rank=None,
            rope_interleave=False,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
    ),
    # MLA's head widths are explicit: hidden 96 over 5 heads is a valid DeepSeek-V3 (transformers runs it).
    "deepseek_v3_heads_not_dividing_hidden": (
        "deepseek_v3",
        dict(DEEPSEEK, hidden_size=96, num_attention_heads=5, num_key_value_heads=5, q_lora_rank=24),
    ),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations and logits, spread-out router scores: routing and argmax are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(0.1 * r if name.endswith("bias") else 1.0 + 0.1 * r)
        else:
            p.copy_(r / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def build_hf(model_type: str, fields: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory written by save_pretrained, the transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (model_type, fields)) in enumerate(CASES.items()):
        model = build_hf(model_type, fields, seed=i)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def tokens(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(hf_model, ours: Transformer, ids: torch.Tensor) -> float:
    return (hf_model(ids).logits - ours(ids)).abs().max().item()


@torch.no_grad()
def naive_greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Recompute the whole sequence each step (no cache)."""
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1] :]


@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1] :]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(hf_models, name):
    directory, hf_model = hf_models[name]
    ours = load_hf_model(directory).eval()
    diff = max_diff(hf_model, ours, tokens())
    print(f"\nPARITY {name}: max |logits diff| = {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(hf_models, name):
    directory, hf_model = hf_models[name]
    ours = load_hf_model(directory).eval()
    prompt = tokens(seed=1, length=8)
    expected = hf_greedy(hf_model, prompt, 32)
    assert torch.equal(naive_greedy(ours, prompt, 32), expected)  # full recompute, no cache
    try:
        from nanoseek.engine import Engine, SamplingParams
    except ImportError:  # the engine is developed alongside; the naive loop above still checks the model
        return
    engine = Engine(ours, max_batch=2, max_seq_len=64, kv_cache_gb=0.05)
    results = engine.generate([p.tolist() for p in prompt], SamplingParams(max_new_tokens=32, temperature=0))
    assert torch.equal(torch.tensor([r[0].token_ids for r in results]), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_export_reloads_in_transformers(hf_models, tmp_path, name):
    directory, hf_model = hf_models[name]
    ours = load_hf_model(directory)
    save_hf(ours, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == hf_model.config.architectures
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    ids = tokens(seed=2)
    with torch.no_grad():
        diff = (reloaded(ids).logits - hf_model(ids).logits).abs().max().item()
    print(f"\nEXPORT {name}: max |logits diff| after save_hf -> from_pretrained = {diff:.3g}")
    assert diff <= 1e-4
    # ... and back into nanoseek: the same tensors.
    again = load_hf_model(tmp_path / "export")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_fused_expert_layout(hf_models, tmp_path, name):
    """transformers 5.x keeps experts fused ([E, 2F, D] gate_up_proj) and can save them that way."""
    _, hf_model = hf_models[name]
    hf_model.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in f.keys())
    assert max_diff(hf_model, load_hf_model(tmp_path).eval(), tokens()) <= 1e-4


def test_sharded_checkpoint_with_and_without_index(hf_models, tmp_path):
    _, hf_model = hf_models["deepseek_v3"]
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert max_diff(hf_model, load_hf_model(tmp_path).eval(), tokens()) <= 1e-4
    (tmp_path / "model.safetensors.index.json").unlink()
    assert max_diff(hf_model, load_hf_model(tmp_path).eval(), tokens()) <= 1e-4
    # Our export shards too.
    save_hf(load_hf_model(tmp_path), tmp_path / "export", max_shard_bytes=100_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (reloaded(tokens()).logits - hf_model(tokens()).logits).abs().max() <= 1e-4


def test_rope_interleave_permutation_matters(hf_models, tmp_path):
    """Loading DeepSeek's interleaved rotary rows as if they were rotate-half breaks parity: the permutation is live."""
    directory, hf_model = hf_models["deepseek_v3"]
    shutil.copytree(directory, tmp_path / "m")
    _edit_config(tmp_path / "m", rope_interleave=False)
    assert max_diff(hf_model, load_hf_model(tmp_path / "m").eval(), tokens()) > 1e-2


def test_bfloat16_load_keeps_router_bias_in_float32(hf_models):
    ours = load_hf_model(hf_models["deepseek_v3"][0], dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert ours.layers[1].mlp.router.e_score_correction_bias.dtype == torch.float32
    assert ours(tokens()).dtype == torch.bfloat16


def test_qwen3_attention_bias_with_zero_o_proj_bias(tmp_path):
    model = build_hf("qwen3", dict(COMMON, attention_bias=True))
    for layer in model.model.layers:
        layer.self_attn.o_proj.bias.data.zero_()
    model.save_pretrained(tmp_path / "zero")
    ours = load_hf_model(tmp_path / "zero").eval()
    assert ours.cfg.qkv_bias and max_diff(model, ours, tokens()) <= 1e-4
    model.model.layers[1].self_attn.o_proj.bias.data.fill_(0.5)
    model.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(HFWeightsError, match=r"o_proj bias.*model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_hf_model(tmp_path / "nonzero")


# ----------------------------------------------------------------------------- RoPE


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn_no_truncate": {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": 64,
        "truncate": False,
        "attention_factor": 1.2,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_frequencies_match_transformers_init_functions(variant):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 50000.0, **ROPE_VARIANTS[variant]}
    config = AutoConfig.for_model("llama", **dict(COMMON, max_position_embeddings=128, rope_parameters=params))
    cfg = hf_config_to_model_config(config.to_dict())
    dim = cfg.attn_head_dim
    ours, attn = rope_frequencies(cfg.rope_theta, dim, cfg.rope_scaling, cfg.max_seq_len)
    theirs, their_attn = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    assert attn == pytest.approx(their_attn, rel=1e-12)
    if variant == "dynamic":  # beyond the trained length the base grows with the sequence
        for seq_len in (128, 200, 1000):
            theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=seq_len)
            ours = dynamic_inv_freq(cfg.rope_theta, dim, cfg.rope_scaling, cfg.max_seq_len, seq_len)
            torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_scaled_rope_llama_parity(tmp_path, variant):
    fields = dict(COMMON, max_position_embeddings=32, rope_parameters={"rope_theta": 10000.0, **ROPE_VARIANTS[variant]})
    model = build_hf("llama", fields)
    model.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    ids = tokens(length=48)  # 48 > 32: dynamic NTK kicks in
    assert max_diff(model, ours, ids) <= 1e-4
    save_hf(ours, tmp_path / "export")  # ... and the scaling survives export
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert max_diff(reloaded, ours, ids) <= 1e-4


def test_transformers_4_style_config_fields():
    """Older config.json files: rope_theta and rope_scaling at the top level, `type` for the rope type."""
    hf = dict(
        COMMON,
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        torch_dtype="bfloat16",
    )
    cfg = hf_config_to_model_config(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    del hf["architectures"]
    hf["model_type"] = "llama"  # no `architectures`: the model_type decides
    assert hf_config_to_model_config(hf) == cfg


def test_deepseek_yarn_softmax_scale_parity(tmp_path):
    params = {
        "rope_theta": 10000.0,
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    model = build_hf("deepseek_v3", dict(DEEPSEEK, q_lora_rank=32, rope_parameters=params))
    model.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    assert max_diff(model, ours, tokens(length=40)) <= 1e-4


# ----------------------------------------------------------------------------- errors


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _rewrite_tensors(directory, edit):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def llama_copy(hf_models, tmp_path):
    shutil.copytree(hf_models["llama"][0], tmp_path / "m")
    return tmp_path / "m"


def test_unknown_architecture(llama_copy):
    _edit_config(llama_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(HFConfigError, match=r"unsupported architecture 'GPT2LMHeadModel'.*supported: LlamaForCausalLM"):
        load_hf_model(llama_copy)


def test_missing_tensor(llama_copy):
    _rewrite_tensors(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFWeightsError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(llama_copy)


def test_unexpected_tensor(llama_copy):
    _rewrite_tensors(llama_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(HFWeightsError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        load_hf_model(llama_copy)


def test_shape_mismatch(llama_copy):
    _rewrite_tensors(llama_copy, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(HFWeightsError, match=r"shape mismatches: model\.norm\.weight \[65\] \(expected \[64\]\)"):
        load_hf_model(llama_copy)


def test_all_problems_reported_at_once(llama_copy):
    def edit(t):
        t.pop("lm_head.weight")
        t["bogus"] = torch.ones(1)
        t["model.norm.weight"] = torch.ones(3)

    _rewrite_tensors(llama_copy, edit)
    with pytest.raises(HFWeightsError) as e:
        load_hf_model(llama_copy)
    assert all(
        s in str(e.value)
        for s in ("missing tensors: lm_head.weight", "unexpected tensors: bogus", "shape mismatches: model.norm.weight")
    )


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (
            dict(
                rope_parameters={
                    "rope_theta": 1e4,
                    "rope_type": "longrope",
                    "short_factor": [1.0],
                    "long_factor": [1.0],
                }
            ),
            r"rope_parameters\.rope_type = 'longrope' is not supported",
        ),
        (dict(rope_scaling={"type": "su", "factor": 2.0}), r"rope_scaling\.rope_type = 'su' is not supported"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor = 0\.5"),
        (dict(hidden_act="gelu"), r"hidden_act = 'gelu'"),
        (dict(mlp_bias=True), r"mlp_bias = True"),
        (dict(quantization_config={"quant_method": "fp8"}), r"quantization_config = 'fp8'"),
        (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types"),
        (dict(hidden_size=None), r"missing required field 'hidden_size'"),
    ],
)
def test_refused_config_fields(llama_copy, changes, pattern):
    _edit_config(llama_copy, **changes)
    with pytest.raises(HFConfigError, match=pattern):
        load_hf_model(llama_copy)


def test_moe_layer_pattern_that_first_k_dense_cannot_express():
    hf = dict(
        COMMON, architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=3, num_experts=4, decoder_sparse_step=2, **MOE
    )
    with pytest.raises(HFConfigError, match=r"decoder_sparse_step = 2.*MoE layers \[1\]"):
        hf_config_to_model_config(hf)
    hf.update(decoder_sparse_step=1, mlp_only_layers=[1])
    with pytest.raises(HFConfigError, match=r"mlp_only_layers = \[1\]"):
        hf_config_to_model_config(hf)
    hf.update(mlp_only_layers=[0, 1])
    assert hf_config_to_model_config(hf).first_k_dense == 2


def test_export_refuses_models_without_a_transformers_twin(tmp_path):
    from nanoseek.model import get_preset

    model = Transformer(get_preset("tiny-moe"))  # GQA + sigmoid router: no transformers architecture computes it
    with pytest.raises(HFConfigError, match="no transformers architecture matches"):
        save_hf(model, tmp_path)


# ----------------------------------------------------------------------------- CLI and checkpoint loading


def _write_tokenizer(directory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def test_convert_command_round_trip(hf_models, tmp_path):
    from nanoseek.cli import main

    src = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2_moe"][0], src)
    _write_tokenizer(src)
    hf_model = hf_models["qwen2_moe"][1]

    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "ns")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "ns").iterdir()
    }
    native = load_model(tmp_path / "ns").eval()
    assert max_diff(hf_model, native, tokens()) <= 1e-4

    assert main(["convert", "--to-hf", str(tmp_path / "ns"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (reloaded(tokens()).logits - hf_model(tokens()).logits).abs().max() <= 1e-4


def test_convert_reports_errors(tmp_path, capsys):
    from nanoseek.cli import main

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "bad" / "model.safetensors"))
    assert main(["convert", "--from-hf", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 1
    assert "unsupported architecture 'BertModel'" in capsys.readouterr().out


def test_convert_from_hf_refuses_a_nanoseek_checkpoint(hf_models, tmp_path, capsys):
    from nanoseek.cli import main
    from nanoseek.model import save_model

    save_model(load_hf_model(hf_models["llama"][0]), tmp_path / "ns")
    assert main(["convert", "--from-hf", str(tmp_path / "ns"), "--out", str(tmp_path / "o")]) == 1
    assert "nanoseek checkpoint already" in capsys.readouterr().out


def test_load_checkpoint_accepts_hf_directory(hf_models):
    from nanoseek.loading import load_checkpoint

    model, tokenizer = load_checkpoint(hf_models["qwen3"][0], device="cpu")
    assert tokenizer is None and not model.training
    assert max_diff(hf_models["qwen3"][1], model, tokens()) <= 1e-4


# ----------------------------------------------------------------------------- memory


def test_load_streams_without_a_second_copy(tmp_path):
    """Peak RSS increase while loading a ~160 MB checkpoint stays below 1.3x its size (fresh subprocess)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--mb", "160", "--dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nMEMORY {result}")
    assert result["ratio"] < 1.3
