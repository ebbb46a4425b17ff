"""Calibration batches for `dsv4 quantize`: from a file, or a small built-in set.

A file is either JSON lines with "input_ids" (token ids, used as they are) or "text" (tokenized with
the checkpoint's own tokenizer), or plain text with one sample per line (tokenized likewise). The
built-in set is deterministic token ids, enough to exercise every layer of a tiny model; a real
calibration of V4 Pro should pass text that resembles its traffic.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import DsV4Error


def builtin_batches(
    vocab_size: int, samples: int, seq_len: int, batch_size: int, seed: int = 0
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (samples, seq_len), generator=gen)
    return list(ids.split(batch_size))


def _tokenize(texts: list[str], model_dir: Path, seq_len: int) -> list[list[int]]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # no tokenizer files, or none transformers can read
        raise DsV4Error(
            f"{model_dir}: cannot load a tokenizer to tokenize the calibration text ({err}); "
            "pass JSON lines with input_ids instead"
        ) from None
    return [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]


def file_batches(
    path: Path, model_dir: Path, vocab_size: int, samples: int, seq_len: int, batch_size: int
) -> list[torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise DsV4Error(f"{path}: calibration file not found")
    if not path.is_file():  # a FIFO would block the read, a folder cannot be read
        raise DsV4Error(f"{path}: the calibration file is not a regular file; pass a .jsonl or text file")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as err:
        raise DsV4Error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows: list[list[int]] = []
    texts: list[str] = []
    for n, line in enumerate(lines[: samples * 4], 1):
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DsV4Error(f"{path}:{n}: not JSON ({err})") from None
            if not isinstance(item, dict):
                raise DsV4Error(
                    f"{path}:{n}: expected an object with input_ids or text, got {line.strip()[:40]}"
                )
            if "input_ids" in item:
                ids = item["input_ids"]
                if not isinstance(ids, list) or not all(type(t) is int for t in ids):
                    raise DsV4Error(f"{path}:{n}: input_ids must be a list of integer token ids")
                rows.append(ids[:seq_len])
            elif "text" in item:
                texts.append(str(item["text"]))
            else:
                raise DsV4Error(f"{path}:{n}: expected an object with input_ids or text")
        else:
            texts.append(line)
    if texts:
        rows += _tokenize(texts, model_dir, seq_len)
    rows = [r for r in rows if r][:samples]
    if not rows:
        raise DsV4Error(f"{path}: no calibration samples")
    bad = [t for r in rows for t in r if not 0 <= t < vocab_size]
    if bad:
        raise DsV4Error(f"{path}: token id {bad[0]} is outside the vocabulary of {vocab_size}")
    width = min(len(r) for r in rows)  # equal lengths: no padding or attention mask to get wrong
    ids = torch.tensor([r[:width] for r in rows])
    return list(ids.split(batch_size))
