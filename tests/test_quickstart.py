"""`dreamtune quickstart`: one real run (shared with test_notebooks.py) checked end to end, plus the
quick pieces (argument errors, held-out problems, thread choice) without a run.

    pytest tests/test_quickstart.py          # about 2-4 minutes on a 2-core CPU: the run is the bulk
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _quickstart_fixture import quickstart_out  # noqa: F401  (a pytest fixture)
from dreamtune import quickstart as Q
from dreamtune.cli import main as cli_main

# The untrained model answers nothing; the tuned one most problems (85-100% over the seeds tried, see
# quickstart.TASKS). The test asks for a gap that any working training clears and no broken one does.
MIN_GAP = 0.5


@pytest.mark.slow
def test_trained_model_is_far_above_untrained(quickstart_out):
    s = quickstart_out["summary"]
    base, tuned = s["accuracy"]["base"], s["accuracy"]["tuned"]
    print(f"quickstart: base {base:.0%}, tuned {tuned:.0%}, {quickstart_out['time_s']:.0f}s, timings {s['timings_s']}")
    assert tuned - base >= MIN_GAP, f"tuned {tuned:.0%} vs base {base:.0%}: training did not learn the task"
    # the accuracies are the graded samples', not a number made up beside them
    samples = [json.loads(x) for x in (quickstart_out["out"] / "eval" / "tuned.samples.jsonl").read_text().splitlines()]
    assert len(samples) == s["eval_problems"]
    assert sum(x["correct"] for x in samples) / len(samples) == pytest.approx(tuned)


@pytest.mark.slow
def test_every_artifact_is_written_where_the_output_says(quickstart_out):
    out, s = quickstart_out["out"], quickstart_out["summary"]
    for key, path in s["paths"].items():
        assert Path(path).exists(), key
    for name in ("report.md", "report.html", "report.json", "loss.png", "lr.png", "grad_norm.png",
                 "tokens_per_s.png", "accuracy.png", "validation.png"):
        assert (out / "report" / name).is_file(), name
    for name in ("train.parquet", "val.parquet", "manifest.json", "validation.json"):
        assert (out / "data" / name).is_file(), name
    assert (out / "tuned" / "checkpoint-final" / "config.json").is_file()
    assert (out / "tuned" / "data_validation.json").is_file()
    # the final table names every path and both accuracies
    for path in s["paths"].values():
        assert path in quickstart_out["stdout"]
    assert f"{100 * s['accuracy']['tuned']:.0f}%" in quickstart_out["stdout"]
    html = (out / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # five figures + the validation histogram, inlined


@pytest.mark.slow
def test_artifacts_follow_docs_formats(quickstart_out):
    out = quickstart_out["out"]
    results = json.loads((out / "eval" / "tuned.json").read_text())
    # the key sets of docs/artifacts.md, as `dreamtune eval` and `dreamtune compare` write them
    assert set(results) == {"model", "tasks", "decoding", "prompt_format", "system_prompt", "shots", "seed", "limit",
                            "data_dir", "batch_size", "world_size", "config_id", "time_s", "generation_time_s",
                            "samples", "created"}
    # Dream's sampler: its settings only (no threshold, block_length, tokens_per_step, use_cache, dual_cache)
    assert set(results["decoding"]) == {"sampler", "alg", "steps", "max_new_tokens", "temperature", "top_p", "top_k",
                                        "alg_temp", "eps"}
    task = results["tasks"]["arithmetic"]
    assert set(task) == {"accuracy", "correct", "total", "by_stage", "no_answer", "errors", "mean_answer_tokens"}
    assert set(task["by_stage"]) == {"exact", "numeric", "math_verify", "none"}
    sample = json.loads((out / "eval" / "tuned.samples.jsonl").read_text().splitlines()[0])
    assert set(sample) == {"task", "id", "question", "prompt", "response", "answer", "extracted", "correct", "stage",
                           "how", "error", "answer_tokens", "nfe", "time_s", "config_id"}
    assert sample["stage"] in ("exact", "none") and sample["question"] in sample["prompt"]
    cmp = json.loads((out / "compare.json").read_text())
    assert set(cmp) == {"base", "tuned", "decoding", "seed", "prompt_format", "task", "rows", "summary", "time_s",
                        "created"}
    assert set(cmp["rows"][0]) == {"prompt", "answer", "id", "base", "tuned", "base_correct", "tuned_correct",
                                   "base_extracted", "tuned_extracted"}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["rows"]["train"] + manifest["rows"]["val"] == manifest["rows"]["input"]
    metrics = [json.loads(x) for x in (out / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, quickstart_out["summary"]["steps"] + 1))
    assert any("val_loss" in m for m in metrics)


@pytest.mark.slow
def test_eval_problems_are_held_out(quickstart_out):
    out = quickstart_out["out"]
    seen = set()
    for split in ("train", "val"):
        for row in pq.read_table(out / "data" / f"{split}.parquet").to_pylist():
            seen.add(row["prompt"][-1]["content"])
    asked = {json.loads(x)["question"] for x in (out / "eval" / "tuned.samples.jsonl").read_text().splitlines()}
    assert asked and not asked & seen


def test_unique_rows_are_distinct_and_seeded():
    a = Q.unique_rows("arithmetic", 500, 3, {"op": "add", "digits": 2})
    assert len({r["prompt"] for r in a}) == 500
    assert a == Q.unique_rows("arithmetic", 500, 3, {"op": "add", "digits": 2})
    assert a != Q.unique_rows("arithmetic", 500, 4, {"op": "add", "digits": 2})
    with pytest.raises(ValueError, match="fewer than"):
        Q.unique_rows("arithmetic", 100, 0, {"op": "add", "digits": 1})  # only 64 one-digit sums


def test_thread_choice(monkeypatch):
    assert Q.cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert Q.cpu_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(Q.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert Q.cpu_threads() == len(Q.os.sched_getaffinity(0))
    monkeypatch.setattr(Q.os, "getloadavg", lambda: (1000.0, 0.0, 0.0))
    assert Q.cpu_threads() == 1


@pytest.mark.parametrize("argv, message", [
    (["--task", "chess"], "unknown --task 'chess'"),
    (["--steps", "0"], "--steps must be a positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_user_mistakes_are_one_error_line(argv, message, capsys, tmp_path):
    assert cli_main(["quickstart", "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "q").exists()  # refused before writing anything


def test_a_full_disk_at_the_first_write_leaves_no_directory(capsys, tmp_path, monkeypatch):
    import errno

    from dreamtune import export

    def full(lm, out, *a, **kw):  # as the real one on a full disk: its directory made, then nothing written
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(export, "save_hf", full)
    assert cli_main(["quickstart", "--out", str(tmp_path / "new" / "q"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the disk is full") and str(tmp_path / "new" / "q") in err[0], err
    assert not (tmp_path / "new").exists()  # nor the parent it made: nothing was written


@pytest.mark.slow
def test_same_seed_same_run(tmp_path):
    """Data, training and answers repeat exactly for a seed (a short run: 2 steps; same thread count)."""
    def run(name):
        s = Q.run(str(tmp_path / name), steps=2, seed=5, threads=1, quiet=True)
        out = Path(s["paths"]["run"]).parent
        losses = [json.loads(x).get("loss") for x in (out / "tuned" / "metrics.jsonl").read_text().splitlines()]
        # everything but the clock and config_id (a hash of the settings, the model's path among them)
        answers = [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "config_id")}
                   for x in (out / "eval" / "tuned.samples.jsonl").read_text().replace(str(out), "").splitlines()]
        return pq.read_table(out / "data" / "train.parquet").to_pylist(), losses, answers

    assert run("a") == run("b")


def test_tiny_yaml_is_the_quickstarts_training_config():
    """configs/tiny.yaml (the embedded default) holds what the quickstart trains arithmetic with, paths aside."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dreamtune.config import load_config

    repo = Path(__file__).resolve().parents[1]
    yaml_cfg = OmegaConf.to_container(load_config(str(repo / "configs" / "tiny.yaml"), []))
    qs = OmegaConf.to_container(load_config(None, Q.train_overrides(
        Q.TASKS["arithmetic"], Path("runs/quickstart/base"), Path("runs/quickstart/data"),
        Path("runs/quickstart/tuned-by-hand"), 58, 0)))
    for d in (yaml_cfg, qs):  # the paths differ in form only (str vs the quickstart's absolute ones)
        d["data"].pop("train_files"), d["data"].pop("val_files")
    assert qs == yaml_cfg
