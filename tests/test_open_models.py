"""The user journey the project exists for: RL-train an open model you already have, then hand it
back to transformers.

A tiny random Qwen2 directory as `save_pretrained` writes it, with a byte-level BPE tokenizer and a
ChatML chat template in tokenizer_config.json (Qwen2.5's layout, built offline), goes through
`nanoseek rl` on a prompts file with a held-out file, then `nanoseek convert --to-hf`. The checks
use transformers as the reference: the prompt the policy sees is what `apply_chat_template`
gives, and the exported model's logits are the RL checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanoseek.cli import main  # noqa: E402
from nanoseek.eval.runner import prompt_ids  # noqa: E402
from nanoseek.loading import load_checkpoint  # noqa: E402
from nanoseek.train.rl import rl, rl_defaults  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split (its tokenizer.json's; transformers' Qwen2Tokenizer applies it too):
# digits one by one, words with their leading space.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FIXTURES = Path(__file__).resolve().parent / "rl_reward_fixtures.py"


def qwen_directory(directory: Path) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        [f"What is {a} + {b}? The answer is {a + b}." for a in range(30) for b in range(30)], trainer
    )
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})
    )
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rl_on_a_hugging_face_qwen_directory_then_back_to_transformers(tmp_path):
    hf_dir = qwen_directory(tmp_path / "qwen")
    questions = [{"prompt": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(10)]
    cfg = rl_defaults()
    cfg.train.steps, cfg.train.lr, cfg.train.device, cfg.train.checkpoint_every = 2, 1e-2, "cpu", 2
    cfg.rl.prompts_file = str(jsonl(tmp_path / "train.jsonl", questions[:6]))
    cfg.rl.eval_file = str(jsonl(tmp_path / "test.jsonl", questions[6:]))
    # math-verify grades the answers (a random model gets none right); a reward that varies with the
    # text gives the update a signal.
    cfg.rl.rewards = f"math=1.0,{FIXTURES}:char_code_reward=0.5"
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.max_new_tokens = 2, 4, 8
    cfg.rl.eval_samples, cfg.rl.micro_batch_size = 2, 8

    _, tokenizer = load_checkpoint(hf_dir, device="cpu")
    reference = AutoTokenizer.from_pretrained(hf_dir)
    message = [{"role": "user", "content": questions[0]["prompt"]}]
    assert prompt_ids(tokenizer, questions[0]["prompt"]) == reference.apply_chat_template(
        message, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.stop_ids  # a chat turn's end stops a rollout

    summary = rl(cfg, tmp_path / "rl", hf_dir, quiet=True)
    assert summary["steps"] == 2 and summary["eval_problems"] == 4
    assert set(summary["before"]) == {"all"} and 0.0 <= summary["after"]["all"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert all("reward/math" in r and "reward/char_code_reward" in r for r in records if "reward" in r)

    assert main(["convert", "--to-hf", str(tmp_path / "rl"), "--out", str(tmp_path / "back")]) == 0
    trained, _ = load_checkpoint(tmp_path / "rl", device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([prompt_ids(tokenizer, questions[7]["prompt"])])
    with torch.no_grad():
        assert (exported(ids).logits - trained(ids)).abs().max() < 1e-4
        assert (exported(ids).logits - original(ids).logits).abs().max() > 1e-3  # RL did move the weights
    back = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(message, add_generation_prompt=True, tokenize=False) == (
        reference.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    )
