"""Micro-batches by token budget (data.micro_batch_tokens): the grouping keeps to the budget, one row per
micro-batch (or a fixed count) reproduces the row-count micro-batches bitwise, resume is exact, and two gloo
ranks match one process."""

import random

import pytest

from dreamtune.cli import main as cli
from test_train import assert_stop_and_resume_is_exact, assert_two_processes_match_one, base_args, metrics

SHORT = ["trainer.total_training_steps=6", "trainer.val_check_steps=0", "trainer.save_checkpoint_steps=100"]


@pytest.mark.parametrize("layout", [dict(cutoff_type=None), dict(cutoff_type="strip_padding"),
                                    dict(cutoff_type="random_with_input_pad"), dict(packing=True)])
def test_groups_keep_to_the_budget_in_order(layout):
    from dreamtune.batching import collate, group_by_tokens, pack, padded_tokens

    rng = random.Random(0)
    rows = [([1] * rng.randint(1, 20), [2] * rng.randint(1, 40) + [0]) for _ in range(64)]
    budget = 200
    groups = group_by_tokens(rows, budget, max_length=64, **layout)
    assert [i for g in groups for i in g] == list(range(64))  # every row once, in order
    sizes = []
    for g, nxt in zip(groups, groups[1:] + [None]):
        members = [rows[i] for i in g]
        assert padded_tokens(members, max_length=64, **layout) <= budget
        if nxt is not None:  # greedy: the next row would not have fitted
            assert padded_tokens(members + [rows[nxt[0]]], max_length=64, **layout) > budget
        if layout.get("packing"):
            batch = pack(members, max_length=64, pad_id=0)
        else:
            batch = collate(members, max_length=64, pad_id=0, cutoff_type=layout["cutoff_type"])
        assert batch.input_ids.numel() <= padded_tokens(members, max_length=64, **layout)  # the bound holds
        sizes.append(len(g))
    assert max(sizes) > 1


@pytest.mark.parametrize("rows", [1, 2])
def test_budget_of_whole_rows_equals_row_count_micro_batches(tiny_model_dir, sft_data, tmp_path, rows):
    """Rows padded to data.max_length=40: a budget of 40 x n tokens makes the micro-batches of n rows, and the
    loss weighting reduces to dividing by the accumulation steps: the runs match bitwise."""
    short = [*SHORT, "trainer.total_training_steps=3"]
    a = base_args(tiny_model_dir, sft_data, tmp_path / "rows", *short, f"data.micro_batch_size_per_gpu={rows}")
    b = base_args(tiny_model_dir, sft_data, tmp_path / "tokens", *short, "data.micro_batch_size_per_gpu=1",
                  f"data.micro_batch_tokens={40 * rows}")
    assert cli(["train", *a]) == 0 and cli(["train", *b]) == 0
    ra, rb = metrics(tmp_path / "rows"), metrics(tmp_path / "tokens")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["grad_norm"] for r in ra] == [r["grad_norm"] for r in rb]


def test_token_budget_resumes_exactly(tiny_model_dir, sft_data, tmp_path):
    assert_stop_and_resume_is_exact(tiny_model_dir, sft_data, tmp_path, "data.micro_batch_size_per_gpu=1",
                                    "data.micro_batch_tokens=100", "data.perbatch_cutoff=true",
                                    "data.perbatch_cutoff_type=random_with_input_pad")


@pytest.mark.distributed
def test_token_budget_two_processes_match_one(tiny_model_dir, sft_data, tmp_path):
    """Global batch 8, budget 120 = 3 rows of 40: micro-batches of 3, 3 and 2 rows; with two ranks one rank
    gets two and the other one plus a zero-weight filler. The losses match one process."""
    extra = [*SHORT, "data.micro_batch_size_per_gpu=1", "data.micro_batch_tokens=120"]
    assert_two_processes_match_one(tiny_model_dir, sft_data, tmp_path, extra, steps=6)
