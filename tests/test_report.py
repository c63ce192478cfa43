"""`dreamtune report` on a small run directory written here: the figures plot exactly the series in the
files (checked on the matplotlib artists and in report.json), the HTML is self-contained, optional
inputs are skipped with a note, and missing required inputs are one error line. A GRPO run's report, on
the run directory of a real tiny GRPO run (tests/conftest.py's grpo_run).

    pytest tests/test_report.py      # a few seconds
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from dreamtune import report as R
from dreamtune.cli import main as cli_main

STEPS = list(range(1, 41))
LOSS = [5.0 / s + 0.01 * (s % 3) for s in STEPS]
LR = [1e-3 * min(1.0, s / 5) for s in STEPS]
GRAD = [1.0 + 0.1 * (s % 4) for s in STEPS]
TOKS = [1000.0 + 10 * s for s in STEPS]
VAL_STEPS = [10, 20, 30, 40]
VAL = [1.5, 0.9, 0.7, 0.6]


def write_run(d: Path) -> Path:
    d.mkdir(parents=True)
    lines = []
    for s, loss, lr, g, t in zip(STEPS, LOSS, LR, GRAD, TOKS):
        lines.append({"step": s, "epoch": s / 40, "loss": loss, "lr": lr, "grad_norm": g, "tokens": 100,
                      "tokens_per_s": t, "masked_tokens": 40, "time_s": s * 0.1})
        if s in VAL_STEPS:
            lines.append({"step": s, "val_loss": VAL[VAL_STEPS.index(s)], "time_s": s * 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 41, "lo')  # cut short
    (d / "config.yaml").write_text("optim:\n  lr: 0.001\ntrainer:\n  total_training_steps: 40\n")
    return d


def write_eval(path: Path, model: str, accs: dict[str, float]) -> Path:
    path.write_text(json.dumps({
        "model": model, "tasks": {t: {"accuracy": a, "correct": int(a * 10), "total": 10, "by_stage": {}} for t, a in accs.items()},
        "decoding": {"alg": "entropy", "steps": 64, "max_new_tokens": 64, "temperature": 0.0},
        "prompt_format": "chat", "seed": 0, "time_s": 1.0, "created": "2026-11-29T00:00:00+00:00"}))
    return path


@pytest.fixture
def inputs(tmp_path):
    run = write_run(tmp_path / "run")
    base = write_eval(tmp_path / "base.json", "/models/base", {"gsm8k": 0.2, "math500": 0.1})
    tuned = write_eval(tmp_path / "tuned.json", str(run / "checkpoint-final"), {"gsm8k": 0.5, "math500": 0.3})
    cmp = tmp_path / "compare.json"
    cmp.write_text(json.dumps({"base": "/models/base", "tuned": str(run / "checkpoint-final"), "decoding": {"alg": "entropy"},
                               "rows": [{"prompt": "2+2=? | sure", "answer": "4", "base": "5", "tuned": "4\nAnswer: 4",
                                         "base_correct": False, "tuned_correct": True},
                                        {"prompt": [{"role": "user", "content": "3*3=?"}], "answer": "9", "base": "9",
                                         "tuned": "9", "base_correct": True, "tuned_correct": True}],
                               "summary": {"base_accuracy": 0.5, "tuned_accuracy": 1.0}}))
    val = tmp_path / "data" / "validation.json"
    val.parent.mkdir()
    stats = {"min": 10, "median": 20.0, "mean": 21.5, "p90": 30.0, "p99": 33.0, "max": 35}
    val.write_text(json.dumps({"tokenizer": "tok", "max_length": 32, "rows": 100, "prompt": stats, "response": stats,
                               "total": stats, "over_max_length": 3, "answer_lost_right_truncation": 2,
                               "policies": {"error": {"run_stops": True}, "drop": {"rows_kept": 97, "rows_dropped": 3}}}))
    return {"run": run, "evals": [base, tuned], "compare": cmp, "validation": val, "tmp": tmp_path}


def _line(fig, label):
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]
    assert len(lines) == 1, f"no single line labelled {label!r}: {[ln.get_label() for ax in fig.axes for ln in ax.get_lines()]}"
    return lines[0]


def test_figures_plot_the_series_of_the_files(inputs):
    metrics = R.read_metrics(inputs["run"])
    evals = R.read_evals([str(p) for p in inputs["evals"]], [])
    figs = R.build_figures(metrics, evals)
    assert set(figs) == {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "accuracy.png"}

    train = _line(figs["loss.png"], "train loss")
    assert list(train.get_xdata()) == STEPS and list(train.get_ydata()) == pytest.approx(LOSS)
    val = _line(figs["loss.png"], "validation loss")
    assert list(val.get_xdata()) == VAL_STEPS and list(val.get_ydata()) == pytest.approx(VAL)
    smooth = _line(figs["loss.png"], f"train loss (mean of {R.SMOOTH})")
    assert smooth.get_ydata()[-1] == pytest.approx(sum(LOSS[-R.SMOOTH:]) / R.SMOOTH)
    for name, key, series in (("lr.png", "lr", LR), ("grad_norm.png", "grad_norm", GRAD), ("tokens_per_s.png", "tokens_per_s", TOKS)):
        line = _line(figs[name], key)
        assert list(line.get_xdata()) == STEPS and list(line.get_ydata()) == pytest.approx(series)

    # accuracy: one bar group per model, one bar per task (sorted), heights in percent
    ax = figs["accuracy.png"].axes[0]
    heights = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert heights == {"base": pytest.approx([20.0, 10.0]), "run": pytest.approx([50.0, 30.0])}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gsm8k", "math500"]


def test_metrics_rows_keep_every_row_in_order_and_skip_a_torn_line(inputs):
    """metrics_rows (what the benchmarks read step times and reward curves from): every written row, train
    and validation interleaved as logged, every key kept; the cut-short last line left out."""
    from dreamtune.report_inputs import metrics_rows

    rows = metrics_rows(inputs["run"])
    assert len(rows) == len(STEPS) + len(VAL_STEPS)
    assert [r["step"] for r in rows if "loss" in r] == STEPS
    assert [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r] == list(zip(VAL_STEPS, VAL))
    assert rows[9]["step"] == 10 and "loss" in rows[9] and rows[10] == {"step": 10, "val_loss": 1.5, "time_s": 1.0}
    assert rows[0]["masked_tokens"] == 40 and rows[-1]["step"] == 40
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        metrics_rows(inputs["tmp"])


def test_report_files_carry_the_series_and_are_self_contained(inputs, capsys):
    out = inputs["tmp"] / "report"
    argv = ["report", str(inputs["run"]), "--compare", str(inputs["compare"]), "--validation", str(inputs["validation"]),
            "--out", str(out)]
    for e in inputs["evals"]:
        argv += ["--eval", str(e)]
    assert cli_main(argv) == 0
    assert "report.html" in capsys.readouterr().out

    data = json.loads((out / "report.json").read_text())
    assert data["series"]["train"]["loss"] == pytest.approx(LOSS)
    assert data["series"]["train"]["step"] == STEPS  # the cut-short last line is skipped
    assert data["series"]["val"] == {"step": VAL_STEPS, "val_loss": pytest.approx(VAL)}
    assert data["series"]["accuracy"] == {"base": {"gsm8k": 0.2, "math500": 0.1}, "run": {"gsm8k": 0.5, "math500": 0.3}}
    assert set(data) == {"run", "series", "figures", "notes", "config"} and "grpo" not in data["series"]  # SFT: no GRPO part

    md = (out / "report.md").read_text()
    for png in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "accuracy.png"):
        assert f"]({png})" in md
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run | gsm8k | 50.0% | 5/10 |" in md
    assert "2+2=? \\| sure" in md  # a | inside a cell is escaped
    assert "4<br>Answer: 4" in md
    assert "over max_length" in md and "| total | 10 | 20 | 21.5 | 30 | 33 | 35 |" in md

    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 5 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing outside the file
    assert "3*3=?" in html and "&lt;" not in md
    assert "GRPO" not in md and "No data validation report" not in md


def test_missing_optional_inputs_are_noted_not_fatal(inputs, capsys):
    out = inputs["tmp"] / "r2"
    assert cli_main(["report", str(inputs["run"]), "--eval", str(inputs["tmp"] / "nope.json"), "--out", str(out)]) == 0
    assert "not found: skipped" in capsys.readouterr().err
    md = (out / "report.md").read_text()
    assert "nope.json not found: skipped" in md
    assert "No comparison given" in md and "No data validation report" in md
    assert not (out / "accuracy.png").exists()


def test_default_out_and_validation_from_the_run(inputs):
    (inputs["run"] / "data_validation.json").write_text(inputs["validation"].read_text())
    assert cli_main(["report", str(inputs["run"])]) == 0
    assert "3 rows over max_length" in (inputs["run"] / "report" / "report.md").read_text()
    assert cli_main(["report", str(inputs["run"])]) == 0  # a second report replaces the first


@pytest.mark.parametrize("case, message", [("no_dir", "does not exist"), ("no_metrics", "metrics.jsonl not found"),
                                           ("empty", "holds no training steps"), ("bad_out", "not a report directory"),
                                           ("a_file", "run directory 'RUN' is a file; pass a training run directory"),
                                           ("metrics_dir", "RUN/metrics.jsonl is a directory, not the run's metrics file"),
                                           ("metrics_bytes", "RUN/metrics.jsonl is not UTF-8 text (a damaged file?)")])
def test_required_inputs_are_one_error_line(case, message, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["report", str(run)]
    message = message.replace("RUN", str(run))
    if case == "a_file":
        run.write_text("")
    elif case != "no_dir":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "metrics_dir":
        (run / "metrics.jsonl").mkdir()
    if case == "metrics_bytes":
        (run / "metrics.jsonl").write_bytes(b'\xff\xfe{"step": 1, "loss": 1.0}\n')
    if case == "bad_out":
        write_run(tmp_path / "real")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("x")
        argv = ["report", str(tmp_path / "real"), "--out", str(tmp_path / "other")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    if case == "bad_out":
        assert (tmp_path / "other" / "keep.txt").exists()
    assert not (run / "report").exists() and not list(tmp_path.rglob(".*tmp-*"))


def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    run, out = write_run(tmp_path / "run"), tmp_path / "report"
    real = Path.write_text

    def write_text(self, *a, **kw):
        if self.name == "report.html":  # the figures and report.md are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert cli_main(["report", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: the disk is full (No space left on device) while writing {out}; free some space"), err
    assert not out.exists() and not list(tmp_path.glob(".report*"))


def test_leaves_are_not_imported_by_the_package():
    pkg = Path(R.__file__).parent
    pattern = re.compile(r"^\s*(from\s+dreamtune(\.report|\.demo)\s+import|import\s+dreamtune\.(report|demo)|from\s+dreamtune\s+import\s+.*\b(report|demo)\b)", re.M)
    offenders = [str(p) for p in pkg.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_inputs_of_another_kind_are_skipped_with_what_they_are(inputs, capsys):
    """The README's layout puts compare.json beside eval_results.json: passing one for the other is said."""
    out = inputs["tmp"] / "r3"
    assert cli_main(["report", str(inputs["run"]), "--eval", str(inputs["compare"]), "--eval", str(inputs["evals"][1]),
                     "--compare", str(inputs["evals"][0]), "--validation", str(inputs["evals"][0]), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"eval results {inputs['compare']} is a comparison (pass it with --compare), not eval results: skipped" in md
    assert f"comparison {inputs['evals'][0]} is eval results (pass it with --eval), not a comparison: skipped" in md
    assert "not a data validation report: skipped" in md
    assert "| run | gsm8k | 50.0% |" in md and "No comparison given" in md  # the right file still read
    assert "No data validation report" in md


def test_the_runs_validation_copy_its_png_and_a_max_length_mismatch(inputs):
    run = inputs["run"]
    (run / "config.yaml").write_text("data:\n  max_length: 64\n  truncation: right\n")
    (run / "data_validation.json").write_text(inputs["validation"].read_text())  # measured at max_length 32
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(run / "data_validation.png", format="png")
    (inputs["validation"].parent / "validation.png").write_bytes(b"not this one")
    out = inputs["tmp"] / "r4"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "3 rows over max_length" in md
    assert "measured at max_length 32; the run trained at data.max_length=64" in md
    assert (out / "validation.png").read_bytes() == (run / "data_validation.png").read_bytes()


def test_truncation_counts_of_the_run_are_shown(inputs):
    run = inputs["run"]
    (run / "data_summary.json").write_text(json.dumps({"truncation": {
        "policy": "right", "max_length": 32, "train": {"rows": 90, "truncated": 7, "answer_lost": 5},
        "val": {"rows": 10, "truncated": 1}}}))
    out = inputs["tmp"] / "r5"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert ("The trainer's truncation (data.truncation=right, max_length 32) train: 7 truncated, 5 answer lost "
            "of 90 rows; val: 1 truncated of 10 rows.") in md
    (run / "data_summary.json").write_text(json.dumps({"rows": 3}))  # no truncation block: noted, not shown
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "The trainer's truncation" not in md and "has no 'truncation' block: skipped" in md


def test_the_trainers_own_truncation_counts_reach_the_report(tiny_model_dir, tmp_path):
    """The real trainer cuts long rows (data.truncation=right) and the report says how many, and how many lost
    their answer, from the trainer's RUN/data_summary.json (counted independently here by length)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import dreamtune
    from dreamtune.data import encode_examples

    rows = [{"prompt": f"What is {i}+{i}?", "response": "Let me think. " * (i % 5 * 3) + f"Answer: {2 * i}"} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    run = tmp_path / "run"
    assert cli_main(["train", f"model.partial_pretrain={tiny_model_dir}", f"data.train_files=[{tmp_path / 'train.parquet'}]",
                     "data.val_files=[]", "data.max_length=60", "data.truncation=right", "data.train_batch_size=4",
                     "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=1", "trainer.device=cpu",
                     f"trainer.default_local_dir={run}", "trainer.logger=['console']"]) == 0
    tok = dreamtune.load(tiny_model_dir).tokenizer
    over = sum(len(p) + len(r) > 60 for p, r in encode_examples(tok, [r["prompt"] for r in rows], [r["response"] for r in rows]))
    assert 0 < over < len(rows)
    assert cli_main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"The trainer's truncation (data.truncation=right, max_length 60) train: {over} truncated" in md
    assert f"{over} answer lost of {len(rows)} rows" in md  # each answer ends its row: every cut row loses it


# ----------------------------------------------------------------------------------------------- GRPO


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _mean(values) -> float:
    return sum(values) / len(values)


def test_grpo_report_shows_the_runs_reward_and_accuracy(grpo_run, tmp_path):
    """The real run's metrics.jsonl: each GRPO figure plots its key's values step by step, report.json holds
    them and the first/last tenth means (20 steps: 2 each), and report.md shows those means."""
    from dreamtune.grpo_config import METRICS

    rows = _rows(grpo_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(set(r) == {"step", "time_s", *METRICS} for r in rows)  # the names the report reads are the recipe's
    assert any(r["reward_mean"] != r["accuracy"] for r in rows)  # the format reward: the two series differ
    assert len({r["reward_mean"] for r in rows}) > 1

    out = tmp_path / "report"
    assert cli_main(["report", str(grpo_run), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    g = data["series"]["grpo"]
    assert g["step"] == list(range(1, 21)) and set(g) == {"step", *R.GRPO_SERIES}
    for key in R.GRPO_SERIES:
        assert g[key] == [r[key] for r in rows], key
    assert data["series"]["train"]["loss"] == [r["loss"] for r in rows]
    want = {"steps_per_tenth": 2, "first": {"steps": [1, 2]}, "last": {"steps": [19, 20]}}
    for key in ("reward_mean", "accuracy", "completion_length"):
        want["first"][key] = _mean([r[key] for r in rows[:2]])
        want["last"][key] = _mean([r[key] for r in rows[-2:]])
    assert data["grpo_tenths"] == want  # the same sums in the same order: equal, not close
    assert data["config"]["trainer.stage"] == "grpo" and data["config"]["grpo.format_reward"] == 0.5

    md = (out / "report.md").read_text()
    f, la = want["first"], want["last"]
    assert "|  | first tenth (steps 1-2) | last tenth (steps 19-20) | change |" in md
    assert f"| reward | {f['reward_mean']:.3f} | {la['reward_mean']:.3f} | {la['reward_mean'] - f['reward_mean']:+.3f} |" in md
    assert (f"| rollout accuracy | {100 * f['accuracy']:.1f}% | {100 * la['accuracy']:.1f}% | "
            f"{100 * (la['accuracy'] - f['accuracy']):+.1f} points |") in md
    assert f"| completion length (tokens) | {f['completion_length']:.1f} | {la['completion_length']:.1f} |" in md
    for png in (*R.GRPO_FIGURES, "loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
        assert f"]({png})" in md and (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert set(data["figures"]) == {*R.GRPO_FIGURES, "loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"}
    html = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == len(data["figures"])

    figs = R.build_figures(R.read_metrics(grpo_run), [])
    steps = list(range(1, 21))
    reward = _line(figs["reward.png"], "reward_mean")
    assert list(reward.get_xdata()) == steps and list(reward.get_ydata()) == [r["reward_mean"] for r in rows]
    band = [c for c in figs["reward.png"].axes[0].collections if c.get_label() == "reward_mean ± reward_std"]
    low, high = band[0].get_paths()[0].vertices[:, 1].min(), band[0].get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(min(r["reward_mean"] - r["reward_std"] for r in rows))
    assert high == pytest.approx(max(r["reward_mean"] + r["reward_std"] for r in rows))
    acc = _line(figs["rollout_accuracy.png"], "accuracy")
    assert list(acc.get_ydata()) == pytest.approx([100 * r["accuracy"] for r in rows])
    for key in ("kl", "clip_fraction", "completion_length"):
        assert list(_line(figs[f"{key}.png"], key).get_ydata()) == [r[key] for r in rows], key
    for key in ("rollout_s", "update_s"):
        assert list(_line(figs["step_time.png"], key).get_ydata()) == [r[key] for r in rows], key


def test_grpo_report_without_a_kl_term_has_no_kl_figure(grpo_run, tmp_path):
    """grpo.beta=0 logs no "kl": the same run's rows without it give no KL figure and no KL series."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kl"}) + "\n"
                                               for r in _rows(grpo_run)))
    assert cli_main(["report", str(run)]) == 0
    data = json.loads((run / "report" / "report.json").read_text())
    assert "kl" not in data["series"]["grpo"] and "reward_mean" in data["series"]["grpo"]
    assert "kl.png" not in data["figures"] and "reward.png" in data["figures"] and not (run / "report" / "kl.png").exists()
