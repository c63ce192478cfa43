"""Shared test fixtures: where ../shared/data is, tiny models written to disk, small SFT datasets, a tiny
GRPO setup and one short GRPO run.

Everything is built in-process; nothing is downloaded. Tests that need ../shared/data skip with a
reason when it is absent (a user's machine).
"""

from __future__ import annotations

import json
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


def record_calls(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call's return value is appended to the returned list (the call itself
    runs unchanged)."""
    returned = []
    real = getattr(module, name)

    def spy(*a, **kw):
        returned.append(real(*a, **kw))
        return returned[-1]

    monkeypatch.setattr(module, name, spy)
    return returned


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


# The GRPO tiny model speaks a 5-character alphabet, and its prompts are GSM8K-shaped rows whose reference
# answer is one digit: the GSM8K grader reads the last number of a completion, so a random model is right now
# and then, and groups have rewards that differ (non-zero advantages).
GRPO_ALPHABET = "0123 "


@pytest.fixture(scope="session")
def grpo_setup(tmp_path_factory):
    """(tiny model directory, GSM8K-shaped prompts file) for GRPO runs."""
    from dreamtune.export import save_hf
    from dreamtune.tiny import tiny_lm

    d = tmp_path_factory.mktemp("grpo")
    save_hf(tiny_lm(alphabet=GRPO_ALPHABET, hidden_size=32, layers=2, heads=4, kv_heads=2), d / "model", dtype=torch.float32)
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(16):
            a = rng.randint(0, 3)
            f.write(json.dumps({"question": f"{a} {rng.randint(0, 3)}", "answer": f"so {a}\n#### {a}"}) + "\n")
    return d / "model", d / "train.jsonl"


def grpo_args(setup, run_dir, *extra) -> list[str]:
    """`dreamtune train` arguments of a tiny GRPO run on CPU (4 prompts x 4 rollouts of 8 tokens a step)."""
    model, prompts = setup
    return ["trainer.stage=grpo", f"model.partial_pretrain={model}", f"grpo.prompts_file={prompts}", "grpo.task=gsm8k",
            "grpo.prompt_format=sft", "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2",
            "grpo.num_generations=4", "grpo.num_iterations=2", "grpo.max_new_tokens=8", "grpo.block_length=4",
            "grpo.temperature=1.0", "grpo.beta=0.1", "optim.lr=1e-3", "optim.warmup_steps_ratio=0", "trainer.device=cpu",
            f"trainer.default_local_dir={run_dir}", "trainer.logger=['console']", *extra]


@pytest.fixture(scope="session")
def grpo_run(grpo_setup, tmp_path_factory) -> Path:
    """The run directory of a real 20-step GRPO run (a few seconds on CPU), its checkpoint-final exported. A
    format reward of 0.5 makes the reward differ from the accuracy (the share of correct rollouts)."""
    from dreamtune.cli import main as cli

    run = tmp_path_factory.mktemp("grpo_run") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        assert cli(["train", *grpo_args(grpo_setup, run, "trainer.total_training_steps=20", "grpo.format_reward=0.5")]) == 0
    finally:
        torch.set_num_threads(old)
    return run
