"""Pretraining and SFT: build the data and the model for a run, then hand both to the training loop.

nanoseek pretrain                       # tiny model, built-in task corpus, CPU
nanoseek sft --checkpoint runs/pretrain # built-in task conversations
torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --preset moe-1b   # data-parallel
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path
from typing import Any, Unpack

from nanoseek.config import RunConfig, TrainConfig, parse_task_weights
from nanoseek.data.errors import BadInputStats
from nanoseek.data.packing import PackedTextDataset
from nanoseek.data.sft import SFTDataset, load_conversations
from nanoseek.data.text import iter_documents
from nanoseek.model import Transformer
from nanoseek.tasks.corpus import pretrain_texts, sft_conversations
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distributed
from nanoseek.train.loop import train
from nanoseek.train.run import Run, RunOptions


def sft_defaults() -> RunConfig:
    """SFT starts from a trained model: a lower peak lr and fewer steps than pretraining."""
    return RunConfig(train=TrainConfig(steps=600, lr=1e-3, warmup_steps=10))


def _task_weights(cfg: RunConfig) -> dict[str, float]:
    return parse_task_weights(cfg.data.tasks, "data.tasks")


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def pretrain_tokenizer(cfg: RunConfig, run_dir: Path, texts: list[str] | None) -> Tokenizer:
    """The run's tokenizer: reuse RUN_DIR/tokenizer, else train one on the data (or the built-in corpus)."""
    tok_dir = run_dir / "tokenizer"
    if not distributed.topology().is_main:  # rank 0 trains and saves it; the others load its file
        distributed.barrier()
        return Tokenizer.load(tok_dir)
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
        distributed.barrier()
        return tokenizer
    if texts is None:
        texts = list(
            islice(iter_documents(cfg.data.files, text_field=cfg.data.text_field, skip_bad=cfg.data.skip_bad), 50_000)
        )
    tokenizer = Tokenizer.train(texts, cfg.data.vocab_size)
    tokenizer.save(tok_dir)
    distributed.barrier()
    return tokenizer


def pretrain(cfg: RunConfig, run_dir: str | Path, **options: Unpack[RunOptions]) -> dict[str, Any]:
    """Train a new model (and its tokenizer, unless RUN_DIR/tokenizer exists) on text."""
    run = Run(cfg, run_dir, "pretrain", **options)
    t = cfg.train
    stats = BadInputStats()
    if cfg.data.files:
        tokenizer = pretrain_tokenizer(cfg, run.run_dir, None)
        common = dict(
            text_field=cfg.data.text_field,
            skip_bad=cfg.data.skip_bad,
            stats=stats,
            val_fraction=cfg.data.val_fraction,
            seed=t.seed,
        )
        data = PackedTextDataset.from_files(cfg.data.files, tokenizer, t.seq_len, t.batch_size, **common)
        val = lambda: PackedTextDataset.from_files(
            cfg.data.files, tokenizer, t.seq_len, t.batch_size, split="val", **common
        )
    else:
        texts = pretrain_texts(cfg.data.builtin_examples, seed=t.seed, weights=_task_weights(cfg))
        tokenizer = pretrain_tokenizer(cfg, run.run_dir, texts)
        data = PackedTextDataset(
            texts, tokenizer, t.seq_len, t.batch_size, val_fraction=cfg.data.val_fraction, seed=t.seed
        )
        val = lambda: PackedTextDataset(
            texts, tokenizer, t.seq_len, t.batch_size, split="val", val_fraction=cfg.data.val_fraction, seed=t.seed
        )
    model = Transformer(cfg.model_config(vocab_size=_round_up(tokenizer.vocab_size)))
    if not run.quiet:
        print(
            f"pretrain: {model.num_params() / 1e6:.2f}M parameters ({model.num_active_params() / 1e6:.2f}M active), "
            f"vocab {tokenizer.vocab_size}, device {run.device}"
            + (f" x {run.topo.world} ranks" if run.topo.world > 1 else ""),
            file=sys.stderr,
        )
    summary = train(run, model, data, tokenizer=tokenizer, val_data=val)
    if stats.count and run.topo.is_main:
        print(stats.report(), file=sys.stderr)
    return summary


def sft(cfg: RunConfig, run_dir: str | Path, checkpoint: str | Path, **options: Unpack[RunOptions]) -> dict[str, Any]:
    """Fine-tune `checkpoint` on conversations; loss only on assistant tokens."""
    run = Run(cfg, run_dir, "sft", **options)
    t = cfg.train
    model, tokenizer = run.load_model(checkpoint)
    stats = BadInputStats()
    if cfg.data.files:
        conversations = load_conversations(cfg.data.files, skip_bad=cfg.data.skip_bad, stats=stats)
        n_val = max(1, int(len(conversations) * cfg.data.val_fraction))
        train_conv, val_conv = conversations[n_val:], conversations[:n_val]
    else:
        weights = _task_weights(cfg)
        # A different seed from pretraining's, so SFT sees new problems of the same tasks.
        train_conv = sft_conversations(cfg.data.builtin_examples, seed=t.seed + 1, weights=weights)
        val_conv = sft_conversations(max(64, t.batch_size * t.eval_batches), seed=t.seed, split="test", weights=weights)
    data = SFTDataset(train_conv, tokenizer, t.seq_len, t.batch_size, seed=t.seed)
    val = lambda: SFTDataset(val_conv, tokenizer, t.seq_len, t.batch_size, shuffle=False, epochs=1)
    summary = train(run, model, data, tokenizer=tokenizer, val_data=val)
    if stats.count and run.topo.is_main:
        print(stats.report(), file=sys.stderr)
    return summary
