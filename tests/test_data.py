"""Data pipeline: file reading and its errors, packing against a plain reference, exact resume, SFT masks."""

from __future__ import annotations

import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanoseek.data import BadInputError, BadInputStats, PackedTextDataset, SFTDataset, iter_documents
from nanoseek.data.jsonl import read_jsonl
from nanoseek.data.packing import IGNORE, is_validation
from nanoseek.data.sft import load_conversations
from nanoseek.tasks.corpus import pretrain_texts, sft_conversations
from nanoseek.tokenizer import Tokenizer


class CharTokenizer:
    """One id per character (id = code point + 1), eos = pad = 0: trivially invertible, for exact checks."""

    eos_id = pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 1 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 1) for i in ids if i > 0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(pretrain_texts(1000, seed=2), vocab_size=384)


def docs(n: int, seed: int = 0) -> list[str]:
    """Documents of varied length (some longer than a row), all distinct."""
    import random

    rng = random.Random(seed)
    return [f"doc{i} " + "abcdefgh"[i % 8] * rng.randint(1, 40) for i in range(n)]


# ---------------------------------------------------------------------------- reading files


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    content = "first doc\nline two\n\n\n  \nsecond\n\nthird: 你好 🙂\nend\n\n"
    (tmp_path / "a.txt").write_text(content, encoding="utf-8")
    reference = [d.strip("\n") for d in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", content) if d.strip()]
    assert (
        list(iter_documents(tmp_path / "a.txt"))
        == reference
        == ["first doc\nline two", "second", "third: 你好 🙂\nend"]
    )


def test_windows_line_ends_and_byte_order_mark(tmp_path):
    (tmp_path / "w.txt").write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode())
    assert list(iter_documents(tmp_path / "w.txt")) == ["one\ntwo", "three"]
    (tmp_path / "w.jsonl").write_bytes('\ufeff{"text": "a"}\r\n{"text": "b"}\r\n'.encode())
    assert list(iter_documents(tmp_path / "w.jsonl")) == ["a", "b"]


def test_jsonl_and_parquet_and_directories(tmp_path):
    texts = [f"document {i} ✓" for i in range(25)]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for t in texts[:10]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n\n")
    table = pa.table({"body": texts[10:], "n": list(range(15))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=4)  # 4 row groups
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == 4
    assert list(iter_documents([tmp_path / "a.jsonl", tmp_path / "b.parquet"], text_field="body")) == texts
    assert list(iter_documents(tmp_path, text_field="body")) == texts  # a folder: its files, sorted


@pytest.mark.parametrize(
    ("name", "content", "line", "reason"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', 3, "not valid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": "ok"}\n', 2, "missing field 'text'"),
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": 5}\n', 3, "is int, not a string"),
        ("bad.jsonl", b'["text"]\n', 1, "expected a JSON object"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
        ("bad.jsonl", b"", None, "empty file"),
        ("bad.txt", b"good\n\nbad \xff\xfe byte\n", 3, "invalid UTF-8"),
        ("bad.txt", b"\n\n  \n", None, "empty file"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, line, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=reason) as info:
        list(iter_documents(path))
    assert (info.value.path, info.value.line) == (str(path), line)
    assert str(info.value).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_bad_parquet_rows_and_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet", row_group_size=2)
    with pytest.raises(BadInputError, match="NoneType") as info:
        list(iter_documents(tmp_path / "nulls.parquet"))
    assert info.value.line == 2
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "col.parquet")
    with pytest.raises(BadInputError, match="no column 'text'"):
        list(iter_documents(tmp_path / "col.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadInputError, match="cannot read as parquet"):
        list(iter_documents(tmp_path / "fake.parquet"))


def test_skip_bad_counts_everything_it_skips(tmp_path, capsys):
    lines = [b'{"text": "one"}', b"{oops", b'{"text": "two"}', b'{"text": null}', b'{"other": 1}', b'{"text": "three"}']
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    stats = BadInputStats(keep=2)
    paths = [tmp_path / "a.jsonl", tmp_path / "empty.txt"]
    assert list(iter_documents(paths, skip_bad=True, stats=stats)) == ["one", "two", "three"]
    assert stats.count == 4 and len(stats.examples) == 2
    assert f"{tmp_path / 'a.jsonl'}:2: not valid JSON" in stats.examples[0]
    assert "skipped 4 bad input record(s)" in stats.report()
    # without a stats object the summary still reaches the user
    assert list(iter_documents(paths, skip_bad=True)) == ["one", "two", "three"]
    assert "skipped 4 bad input record(s)" in capsys.readouterr().err


def test_read_jsonl_numbers_lines_and_names_the_bad_ones(tmp_path):
    """Blank lines skipped but counted, a byte-order mark and Windows line ends accepted, any JSON value."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n  \n"s"\r\n{bad\n[1, 2]\ncaf\xe9\nnull')
    got = list(read_jsonl(path, errors="yield"))
    good = [(n, v) for n, v in got if not isinstance(v, BadInputError)]
    assert good == [(1, {"a": 1}), (4, "s"), (6, [1, 2]), (8, None)]
    bad = [v for _, v in got if isinstance(v, BadInputError)]
    assert [(e.path, e.line) for e in bad] == [(str(path), 5), (str(path), 7)]
    assert str(bad[0]).startswith(f"{path}:5: not valid JSON (") and str(bad[1]).startswith(f"{path}:7: invalid UTF-8")
    it = read_jsonl(path)  # errors="raise": the good lines before the first bad one, then the error
    assert [next(it), next(it)] == [(1, {"a": 1}), (4, "s")]
    with pytest.raises(BadInputError, match=":5: not valid JSON"):
        next(it)


def test_reading_is_streaming(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(1000)))
    it = iter_documents(path)
    assert next(it) == "d0"
    with open(path, "a") as f:  # a generator that had read the whole file would not see this
        f.write("{broken\n")
    with pytest.raises(BadInputError, match=":1001: not valid JSON"):
        list(it)


# ---------------------------------------------------------------------------- packing


def reference_rows(texts: list[str], tokenizer, seq_len: int) -> list[tuple[list[int], ...]]:
    """Straightforward packing: concatenate doc+eos, cut into rows, compute labels from the doc index."""
    stream, owner = [], []
    for d, text in enumerate(texts):
        ids = [*tokenizer.encode(text), tokenizer.eos_id]
        stream += ids
        owner += [d] * len(ids)
    rows = []
    for start in range(0, len(stream), seq_len):
        end = min(start + seq_len, len(stream))
        inp = stream[start:end]
        tgt = [stream[t + 1] if t + 1 < len(stream) and owner[t + 1] == owner[t] else IGNORE for t in range(start, end)]
        pos = [t - max(start, owner.index(owner[t])) for t in range(start, end)]
        first = owner[start]
        doc = [owner[t] - first for t in range(start, end)]
        pad = seq_len - len(inp)
        rows.append((inp + [0] * pad, tgt + [IGNORE] * pad, pos + list(range(pad)), doc + [doc[-1] + 1] * pad))
    return rows


def test_packing_matches_reference_without_shuffle():
    texts = docs(60)
    train = [t for i, t in enumerate(texts) if not is_validation(i, t, 0.1)]
    data = PackedTextDataset(
        texts, CharTokenizer(), seq_len=16, batch_size=3, val_fraction=0.1, shuffle_buffer=0, epochs=1
    )
    batches = list(data)
    rows = reference_rows(train, CharTokenizer(), 16)
    assert sum(len(b["input_ids"]) for b in batches) == len(rows)
    got = [
        tuple(b[k][r].tolist() for k in ("input_ids", "targets", "positions", "doc_ids"))
        for b in batches
        for r in range(len(b["input_ids"]))
    ]
    assert got == rows
    for b in batches:
        assert all(v.dtype == torch.int64 and v.shape == b["input_ids"].shape for v in b.values())


def test_packing_invariants_with_real_tokenizer(tok):
    texts = pretrain_texts(200, seed=5)
    data = PackedTextDataset(
        texts, tok, seq_len=64, batch_size=4, val_fraction=0.05, seed=1, shuffle_buffer=32, epochs=1
    )
    seen = []
    for batch in data:
        x, y, pos, doc = batch["input_ids"], batch["targets"], batch["positions"], batch["doc_ids"]
        assert x.shape[1] == 64
        # targets are the next input inside a document and -100 after eos
        inside = doc[:, 1:] == doc[:, :-1]
        assert torch.equal(
            torch.where(inside, x[:, 1:], IGNORE)[x[:, :-1] != tok.eos_id], y[:, :-1][x[:, :-1] != tok.eos_id]
        )
        assert (y[x == tok.eos_id] == IGNORE).all()
        # positions restart exactly where doc_ids change; doc_ids count up from 0 in each row
        assert torch.equal(pos[:, 1:] == 0, ~inside)
        assert (doc[:, 0] == 0).all() and ((doc[:, 1:] - doc[:, :-1]) >= 0).all()
        seen.append(x.flatten())
    # one epoch holds every train document exactly once (rebuilt by splitting the stream at eos)
    stream = torch.cat(seen).tolist()
    rebuilt, current = [], []
    for t in stream:
        if t == tok.eos_id:
            if current:
                rebuilt.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    train = [t for i, t in enumerate(texts) if not is_validation(i, t, 0.05)]
    assert sorted(rebuilt) == sorted(train)
    assert rebuilt != train  # shuffled


def test_validation_split_is_disjoint_and_never_empty():
    texts = docs(400, seed=1)
    tk = CharTokenizer()
    val = PackedTextDataset(texts, tk, seq_len=32, batch_size=8, split="val", val_fraction=0.05)
    train = PackedTextDataset(texts, tk, seq_len=32, batch_size=8, val_fraction=0.05, epochs=1)

    def documents(ds) -> set[str]:
        stream = torch.cat([b["input_ids"].flatten() for b in ds]).tolist()
        return {tk.decode(part) for part in _split(stream, tk.eos_id)}

    val_docs, train_docs = documents(val), documents(train)
    assert val_docs and not val_docs & train_docs
    assert val_docs | train_docs == set(texts)
    assert texts[0] in val_docs and 5 <= len(val_docs) <= 45
    tiny = PackedTextDataset(["only one", "two"], tk, seq_len=8, batch_size=1, split="val", val_fraction=0.001)
    assert "only one" in documents(tiny)


def _split(ids: list[int], sep: int) -> list[list[int]]:
    parts, current = [], []
    for i in ids:
        if i == sep:
            if current:
                parts.append(current)
            current = []
        else:
            current.append(i)
    return parts + ([current] if current else [])


def test_order_is_deterministic_in_the_seed():
    texts = docs(100)
    take = lambda seed: [
        b["input_ids"]
        for _, b in zip(range(5), PackedTextDataset(texts, CharTokenizer(), 16, 2, seed=seed, shuffle_buffer=20))
    ]
    assert all(torch.equal(a, b) for a, b in zip(take(3), take(3)))
    assert not all(torch.equal(a, b) for a, b in zip(take(3), take(4)))


@pytest.mark.parametrize("k", [1, 7, 40])
def test_resume_continues_with_exactly_the_next_batch(tmp_path, k):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(50, seed=3)))
    make = lambda: PackedTextDataset.from_files(
        path, CharTokenizer(), seq_len=24, batch_size=3, seed=5, shuffle_buffer=10
    )
    reference = make()
    expected = [reference.next_batch() for _ in range(k + 3)]  # 40 batches cross several epochs
    first = make()
    for _ in range(k):
        first.next_batch()
    state = pickle.loads(pickle.dumps(json.loads(json.dumps(first.state_dict()))))  # plain data, survives json
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.raises(ValueError, match="saved with"):
        PackedTextDataset.from_files(path, CharTokenizer(), seq_len=32, batch_size=3, seed=5).load_state_dict(state)


def test_empty_train_split_is_an_error():
    data = PackedTextDataset(["just one document"], CharTokenizer(), seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="train split is empty"):
        data.next_batch()


# ---------------------------------------------------------------------------- SFT


def test_sft_loss_is_only_on_assistant_tokens(tok):
    conversations = sft_conversations(40, seed=1)
    conversations[0] = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "<think>\n2+2=4: 4\n</think>\n\\boxed{4}"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "\\boxed{6}"},
        ]
    }
    data = SFTDataset(conversations, tok, seq_len=192, batch_size=4, seed=0, epochs=1)
    learned, total_rows = [], 0
    for batch in data:
        x, y, pos, doc = batch["input_ids"], batch["targets"], batch["positions"], batch["doc_ids"]
        total_rows += len(x)
        for r in range(len(x)):
            for d in doc[r].unique().tolist():
                sel = doc[r] == d
                targets = y[r][sel]
                assert torch.equal(pos[r][sel], torch.arange(int(sel.sum())))  # positions restart per conversation
                if (x[r][sel] == tok.pad_id).all() and (targets == IGNORE).all():
                    continue  # padding
                learned.append(tok.decode(targets[targets != IGNORE].tolist()))
    expected = [
        "".join(m["content"] + "<|im_end|>" for m in c["messages"] if m["role"] == "assistant") for c in conversations
    ]
    assert sorted(learned) == sorted(expected)
    assert total_rows < len(conversations)  # several conversations share a row
    assert data.num_loss_tokens == sum(len(tok.encode(e)) for e in expected)


def test_sft_packing_and_resume(tok):
    conversations = sft_conversations(30, seed=2)
    make = lambda: SFTDataset(conversations, tok, seq_len=128, batch_size=2, seed=3)
    reference = make()
    expected = [reference.next_batch() for _ in range(12)]  # crosses epochs
    resumed = make()
    for _ in range(5):
        resumed.next_batch()
    state = resumed.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_sft_truncates_long_conversations_and_says_so(tok, capsys):
    long = [{"messages": [{"role": "user", "content": "hi " * 300}, {"role": "assistant", "content": "ok"}]}]
    data = SFTDataset(long + sft_conversations(3), tok, seq_len=160, batch_size=1, epochs=1)
    assert data.truncated == 1 and "1 conversation(s) longer than 160" in capsys.readouterr().err
    with pytest.raises(ValueError, match="conversation 0: no assistant message"):
        SFTDataset([[{"role": "user", "content": "hi"}]], tok, seq_len=64, batch_size=1)


def test_sft_file_validation(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [
        json.dumps(good),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": []}),
        "{not json",
        json.dumps(good),
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadInputError, match="message 0 has role 'robot'") as info:
        load_conversations(path)
    assert info.value.line == 2
    stats = BadInputStats()
    assert load_conversations(path, skip_bad=True, stats=stats) == [good["messages"]] * 2
    assert stats.count == 5
    reasons = "\n".join(stats.examples)
    for expected in (
        "sft.jsonl:3: message 0 has no string 'content'",
        ":4: no assistant message",
        ":5: missing or empty",
        ":6: not valid JSON",
    ):
        assert expected in reasons
