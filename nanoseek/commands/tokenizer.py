"""`nanoseek tokenizer train|show`: train a byte-level BPE tokenizer, or look at how one splits text."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a tokenizer (default corpus: the built-in task mixture)")
    train.add_argument("--input", nargs="+", default=None, help=".txt/.jsonl/.parquet files or folders")
    train.add_argument("--text-field", default="text", help="field (jsonl) or column (parquet) with the text")
    train.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    train.add_argument("--vocab-size", type=int, default=512, help="tokens in the vocabulary")
    train.add_argument("--corpus-docs", type=int, default=20000, help="documents of the built-in corpus")
    train.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus")
    train.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    show = sub.add_parser("show", help="print a tokenizer's size, special ids and how it splits a text")
    show.add_argument("tokenizer", help="directory with tokenizer.json, or the file itself")
    show.add_argument("--text", default="What is 47 + 38?", help="text to tokenize")


def run(args: argparse.Namespace) -> int:
    from nanoseek.tokenizer import Tokenizer

    if args.action == "show":
        tok = Tokenizer.load(args.tokenizer)
        ids = tok.encode(args.text)
        print(tok)
        print(f"eos={tok.eos_id} pad={tok.pad_id} bos={tok.bos_id} stop_ids={tok.stop_ids}")
        print(f"{len(ids)} tokens: {[tok.decode([i]) for i in ids]}")
        return 0

    from nanoseek.data.errors import BadInputStats

    stats = BadInputStats()
    if args.input:
        from nanoseek.data.text import iter_documents

        texts = iter_documents(args.input, text_field=args.text_field, skip_bad=args.skip_bad, stats=stats)
        source = ", ".join(args.input)
    else:
        from nanoseek.tasks.corpus import pretrain_texts

        texts = pretrain_texts(args.corpus_docs, seed=args.seed)
        source = f"built-in task corpus ({args.corpus_docs} documents)"
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size)
    tok.save(args.out)
    if stats.count:
        print(stats.report())
    print(f"trained on {source}: vocab_size={tok.vocab_size}, saved to {args.out}")
    return 0
