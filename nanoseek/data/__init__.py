"""Data pipeline: stream text files, pack them for pretraining, batch conversations for SFT.

- `nanoseek.data.text`: `iter_documents` over .txt / .jsonl / .parquet, streaming;
- `nanoseek.data.packing`: `PackedTextDataset`, documents packed into [B, T] rows, resumable;
- `nanoseek.data.sft`: `load_conversations`, `SFTDataset` with loss only on assistant tokens;
- `nanoseek.data.errors`: `BadInputError` (file and line) and `BadInputStats` (for skip_bad).
- `nanoseek.data.jsonl`: `read_jsonl`, the one JSONL reader (line numbers, bad lines named).

Importing this package does not import torch; the datasets import it when they build a batch.
"""

from nanoseek.data.errors import BadInputError, BadInputStats
from nanoseek.data.packing import PackedTextDataset
from nanoseek.data.sft import SFTDataset, iter_conversations, load_conversations
from nanoseek.data.text import iter_documents

__all__ = [
    "BadInputError",
    "BadInputStats",
    "PackedTextDataset",
    "SFTDataset",
    "iter_conversations",
    "iter_documents",
    "load_conversations",
]
