"""Checkpoints at scale, on CPU: the pre-flight size estimate against the bytes written and the free disk, a
save that fails on a full disk (nothing half-written, the earlier checkpoint resumes exactly), weights-only
and background saves, MFU in the metrics, and the truncation counts of the training data."""

import errno
import json
import threading

import pytest
import torch

from conftest import record_calls, write_parquet
from dreamtune.cli import main as cli
from test_train import assert_stop_and_resume_is_exact, base_args, dcp_load, dcp_state, metrics

SHORT = ["trainer.total_training_steps=6", "trainer.val_check_steps=0", "trainer.save_checkpoint_steps=3"]


def estimates(monkeypatch):
    """Record what the trainer's pre-flight computed (the sizes it checks against the disk)."""
    import dreamtune.train as T

    return record_calls(monkeypatch, T, "preflight_disk")


@pytest.mark.parametrize("setting", ["optim.state_dtype=float32", "optim.state_dtype=bfloat16",
                                     "trainer.save_optimizer=false", "model.lora_rank=4 trainer.export_dream=true"])
def test_size_estimate_matches_the_bytes_written(tiny_model_dir, sft_data, tmp_path, monkeypatch, setting):
    """The pre-flight's size of a resumable checkpoint (or a weights-only one) and of checkpoint-final (and
    the Dream-format copy) are within 5% of the files the run then writes."""
    from dreamtune.disk import dir_bytes

    seen = estimates(monkeypatch)
    run = tmp_path / "run"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *SHORT, *setting.split())]) == 0
    est = seen[0]
    kind = "weights" if "save_optimizer=false" in setting else "resumable"
    for name, key in [("checkpoint-6", kind), ("checkpoint-final", "final")] + (
            [("checkpoint-final-dream", "final")] if "export_dream" in setting else []):
        written = dir_bytes(run / name)
        assert est[key] == pytest.approx(written, rel=0.05), (name, est[key], written)
    if kind == "resumable":  # the weights-only estimate is the model part alone: well under the whole
        assert est["weights"] < 0.6 * est["resumable"]


def fake_free(monkeypatch, free: int):
    import shutil

    import dreamtune.disk as C

    real = shutil.disk_usage
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_preflight_refuses_a_run_whose_checkpoints_cannot_fit(tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys):
    """Free space below what keep_last + 1 resumable checkpoints and checkpoint-final need: one error line with
    the numbers and the choices, before the run directory exists; with a little more room, a warning."""
    seen = estimates(monkeypatch)
    run = tmp_path / "run"
    args = base_args(tiny_model_dir, sft_data, run, *SHORT, "trainer.save_checkpoint_steps=1")
    assert cli(["train", *args, "trainer.total_training_steps=1"]) == 0  # to learn the sizes
    est = seen[0]
    need = 3 * est["resumable"] + est["final"]  # keep_last 2, + 1 while the third is written
    capsys.readouterr()
    fake_free(monkeypatch, int(0.95 * need))
    other = tmp_path / "other"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, other, *SHORT, "trainer.save_checkpoint_steps=1")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: not enough disk space") and "Traceback" not in err, err
    for part in ["3 resumable checkpoint(s)", "checkpoint-final", "trainer.keep_last (now 2)", "trainer.save_optimizer=false",
                 "trainer.default_local_dir"]:
        assert part in last, (part, last)
    assert not other.exists()

    fake_free(monkeypatch, int(1.1 * need))  # fits, but only just: a warning, and the run goes on
    assert cli(["train", *base_args(tiny_model_dir, sft_data, other, *SHORT, "trainer.save_checkpoint_steps=1")]) == 0
    assert "warning: this run's checkpoints need" in (other / "train.log").read_text()
    # weights-only saves need less: the same disk takes them without a warning
    fake_free(monkeypatch, int(0.95 * need))
    third = tmp_path / "third"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, third, *SHORT, "trainer.save_checkpoint_steps=1",
                                    "trainer.save_optimizer=false")]) == 0
    assert "warning" not in (third / "train.log").read_text()


def fail_writes_of(monkeypatch, checkpoint: str, after_items: int = 2):
    """DCP's file writer raises ENOSPC partway through `checkpoint` (after a few tensors), as a full disk does."""
    import torch.distributed.checkpoint.filesystem as F

    real = F._write_item
    calls = {"n": 0}

    def writer(transforms, stream, *a, **kw):
        if f".{checkpoint}.tmp-" in str(getattr(stream, "name", "")):
            calls["n"] += 1
            if calls["n"] > after_items:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(transforms, stream, *a, **kw)

    monkeypatch.setattr(F, "_write_item", writer)
    return calls


@pytest.mark.filterwarnings("ignore:'dreamtune.cli' found in sys.modules")
def test_python_m_dreamtune_cli_prints_a_failed_save_as_one_line(monkeypatch, capsys):
    """`python -m dreamtune.cli VERB` turns the RunError a verb raises (a failed save) into one line and exit 1,
    as the `dreamtune` command does."""
    import runpy
    import sys

    import dreamtune.doctor
    from dreamtune.cli import RunError

    def failing_save(argv):
        raise RunError("could not save checkpoint-6 in RUN: the disk is full (No space left on device)")

    monkeypatch.setattr(dreamtune.doctor, "main", failing_save)
    monkeypatch.setattr(sys, "argv", ["dreamtune", "doctor"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("dreamtune.cli", run_name="__main__")
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: could not save checkpoint-6 in RUN: the disk is full (No space left on device)\n", err


@pytest.mark.parametrize("background", [False, True])
def test_full_disk_during_a_save_keeps_the_last_checkpoint_and_resumes_exactly(tiny_model_dir, sft_data, tmp_path,
                                                                                monkeypatch, capsys, background):
    extra = [*SHORT, f"trainer.async_save={str(background).lower()}"]
    assert cli(["train", *base_args(tiny_model_dir, sft_data, tmp_path / "whole", *extra)]) == 0
    run = tmp_path / "run"
    calls = fail_writes_of(monkeypatch, "checkpoint-6")
    capsys.readouterr()
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *extra)]) == 1
    assert calls["n"] > 2  # it did fail partway through the second save
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: could not save checkpoint-6") and "the disk is full" in last, last
    assert "the last good checkpoint checkpoint-3 is kept" in last and "trainer.resume_training=true" in last, last
    assert not list(run.glob(".checkpoint-*")), "a partial checkpoint was left"
    assert (run / "latest").read_text() == "checkpoint-3"
    assert not (run / "checkpoint-6").exists() and not (run / "checkpoint-final").exists()

    monkeypatch.undo()  # room again: resume from checkpoint-3; the run ends as if nothing had happened
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *extra, "trainer.resume_training=true")]) == 0
    a, b = metrics(tmp_path / "whole"), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise
    wa, wb = dcp_state(tmp_path / "whole" / "checkpoint-6"), dcp_state(run / "checkpoint-6")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_weights_only_checkpoint_resumes_with_fresh_moments(tiny_model_dir, sft_data, tmp_path):
    """trainer.save_optimizer=false: the checkpoint has no optimizer state; resume says the moments restart,
    the first resumed step equals the unbroken run's (same weights, same draws), and the optimizer counts its
    steps from the resume on."""
    assert cli(["train", *base_args(tiny_model_dir, sft_data, tmp_path / "whole", *SHORT)]) == 0
    parts = base_args(tiny_model_dir, sft_data, tmp_path / "parts", *SHORT)
    assert cli(["train", *parts, "trainer.save_optimizer=false", "trainer.max_steps_this_run=3"]) == 0
    saved = dcp_load(tmp_path / "parts" / "checkpoint-3")
    assert set(saved) == {"model"}
    whole3 = dcp_state(tmp_path / "whole" / "checkpoint-3")
    assert all(torch.equal(saved["model"][k], whole3[k]) for k in whole3)
    assert cli(["train", *parts, "trainer.resume_training=true"]) == 0
    log = (tmp_path / "parts" / "train.log").read_text()
    assert "checkpoint-3 holds the weights only" in log and "moments restart from zero at step 3" in log
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a[:4]] == [r["loss"] for r in b[:4]]  # steps 1-3, and 4 (same weights and draws)
    assert a[4]["loss"] != b[4]["loss"]  # step 5 follows an update made with fresh moments
    steps = {float(st["step"]) for st in dcp_load(tmp_path / "parts" / "checkpoint-6")["optim"]["state"].values()}
    assert steps == {3.0}  # three updates since the resume (the unbroken run has made six)


def test_background_save_does_not_stall_training_and_resumes_exactly(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """trainer.async_save=true: the write of checkpoint-3 is held until training has logged step 4; it still
    holds the step-3 state (copied before training went on), and resuming from it equals an unbroken run."""
    import torch.distributed.checkpoint.filesystem as F

    import dreamtune.monitor as M

    assert cli(["train", *base_args(tiny_model_dir, sft_data, tmp_path / "whole", *SHORT)]) == 0
    stepped, held = threading.Event(), {}
    real_log, real_write = M.Monitor.log, F._write_item

    def log(self, step, row):
        real_log(self, step, row)
        if step == 4 and "loss" in row:
            stepped.set()

    def writer(transforms, stream, *a, **kw):
        if ".checkpoint-3.tmp-" in str(getattr(stream, "name", "")) and "waited" not in held:
            held["waited"] = stepped.wait(timeout=60)  # a foreground save would wait here in vain
        return real_write(transforms, stream, *a, **kw)

    monkeypatch.setattr(M.Monitor, "log", log)
    monkeypatch.setattr(F, "_write_item", writer)
    run = tmp_path / "run"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *SHORT, "trainer.async_save=true")]) == 0
    assert held["waited"] is True
    w3, whole3 = dcp_state(run / "checkpoint-3"), dcp_state(tmp_path / "whole" / "checkpoint-3")
    assert all(torch.equal(w3[k], whole3[k]) for k in whole3)
    monkeypatch.undo()
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *SHORT, "trainer.async_save=true",
                                    f"trainer.resume_path={run / 'checkpoint-3'}")]) == 0
    a, b = metrics(tmp_path / "whole"), metrics(run)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_background_saves_stop_and_resume_exactly(tiny_model_dir, sft_data, tmp_path):
    """Background saves of the full state: stop after 3 of 6 steps, resume; bitwise equal to an unbroken run."""
    assert_stop_and_resume_is_exact(tiny_model_dir, sft_data, tmp_path, "trainer.async_save=true")
    assert (tmp_path / "parts" / "latest").read_text() == "checkpoint-6"


def test_mfu_follows_the_documented_formula(tiny_model_dir, sft_data, tmp_path):
    """With trainer.peak_tflops set (CPU), metrics.jsonl and the console line carry MFU; its FLOPs per token
    are 6N + 12 x layers x hidden x the attended length (rows padded to data.max_length here). Without the
    setting, CPU runs log no MFU."""
    import dreamtune

    run = tmp_path / "run"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, *SHORT, "trainer.peak_tflops=0.001",
                                    "trainer.log_steps=1")]) == 0
    lm = dreamtune.load(tiny_model_dir)
    n = sum(p.numel() for p in lm.model.parameters())
    c = lm.model.config
    per_token = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 40  # data.max_length=40
    for r in metrics(run):
        assert r["mfu"] * 1e9 / r["tokens_per_s"] == pytest.approx(per_token, rel=1e-6)
    assert "| MFU " in (run / "train.log").read_text()
    plain = tmp_path / "plain"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, plain, *SHORT)]) == 0
    assert all("mfu" not in r for r in metrics(plain))


def test_flop_counter_counts_attention_per_document():
    from dreamtune.batching import pack
    from dreamtune.monitor import flop_counter
    from dreamtune.tiny import tiny_lm

    lm = tiny_lm(hidden_size=32, layers=2)
    n = sum(p.numel() for p in lm.model.parameters())
    count = flop_counter(lm.model, lora=False)
    batch = pack([([1, 2], [3, 0]), ([1], [2, 3, 4, 0]), ([5, 6, 7], [0])], max_length=6, pad_id=0)
    lengths = [4, 5, 4]  # the documents; attention stays inside each
    assert count(batch) == 6 * n * sum(lengths) + 12 * 2 * 32 * sum(x * x for x in lengths)
    assert flop_counter(lm.model, lora=True)(batch) - 4 * n * sum(lengths) == count(batch) - 6 * n * sum(lengths)


def test_truncation_counts_match_data_validate(tiny_model_dir, tmp_path):
    """At start, training says how many rows are cut and how many lose their final answer, and writes the counts to
    RUN/data_summary.json; they are the counts `dreamtune data validate` reports for the same rows."""
    from dreamtune.data_validate import validate

    rows = []
    for i in range(24):  # responses of growing length, the answer at the end; at max_length 60 some are cut
        work = " ".join(["1+1=2"] * (i % 8 + 2))
        rows.append({"prompt": f"{i}+{i}=?", "response": f"{work} #### {2 * i}"})
    data = tmp_path / "data"
    write_parquet(rows[:16], data / "train.parquet")
    write_parquet(rows[16:], data / "val.parquet")
    run = tmp_path / "run"
    assert cli(["train", f"model.partial_pretrain={tiny_model_dir}", f"data.train_files={data / 'train.parquet'}",
                f"data.val_files={data / 'val.parquet'}", "data.max_length=60", "data.truncation=right",
                "data.train_batch_size=4", "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=1",
                f"trainer.default_local_dir={run}", "trainer.device=cpu"]) == 0
    summary = json.loads((run / "data_summary.json").read_text())["truncation"]
    import dreamtune

    report = validate(str(data), dreamtune.load(tiny_model_dir).tokenizer, 60, out=str(tmp_path / "v.json"))
    for split in ("train", "val"):
        mine, theirs = summary[split], report["splits"][split]
        assert mine["over_max_length"] == mine["truncated"] == theirs["over_max_length"]
        assert mine["answer_lost"] == theirs["answer_lost_right_truncation"]
    train = summary["train"]
    assert 0 < train["answer_lost"] < train["truncated"], train  # some lose only their eos: the test tells them apart
    assert (f"train: {train['truncated']} of 16 rows are longer than data.max_length=60 and were cut at the end "
            f"(data.truncation=right); {train['answer_lost']} of them lost their final answer") in (run / "train.log").read_text()
