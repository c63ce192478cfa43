"""Shared test fixtures: where ../shared/data is, tiny models written to disk, small SFT datasets.

Everything is built in-process; nothing is downloaded. Tests that need ../shared/data skip with a
reason when it is absent (a user's machine).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than with threads fighting other processes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def shared_or_skip(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present: this test reads the data kept beside the repository in ../shared/data")
    return p


@pytest.fixture(scope="session")
def dream_tokenizer_dir() -> Path:
    return shared_or_skip("tokenizer-dream")


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"{a}+{b}=?", "response": f"{a}+{b}={a + b}"})
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Dream-architecture model (qwen2, bidirectional, shifted) saved as an HF directory."""
    from dreamtune.export import save_hf
    from dreamtune.tiny import tiny_lm

    d = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(tiny_lm(hidden_size=32, layers=2, heads=4, kv_heads=2), d, dtype=torch.float32)
    return d


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """train.parquet (48 rows) and val.parquet (8 rows) of 2-digit additions in prompt/response form."""
    d = tmp_path_factory.mktemp("sft")
    rows = addition_rows(56)
    write_parquet(rows[:48], d / "train.parquet")
    write_parquet(rows[48:], d / "val.parquet")
    return d
