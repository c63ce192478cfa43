"""The README's workflow on a tiny model, in the README's own folder layout and with its commands: data
(steps 3-5, plus a what-if validation), training (6), then the evaluation journey, steps 9-13: compare ->
results/compare.json, eval -> results/eval_results.json in the same results/ folder, the report, both
notebooks on those files, and the demo page built (not served).

Nothing comes from outside the test's folder: the benchmark files are written here, in ./data/eval, where
eval and compare find them without --data-dir.

    pytest tests/test_readme_journey.py     # about a minute on 2 cores
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import addition_rows
from dreamtune.cli import main as cli
from dreamtune.export import save_hf
from dreamtune.tiny import tiny_lm

TASKS = "gsm8k,math500,aime24,aime25,amc23"
MAX_LENGTH = 128
# Steps 9-10 with the README's flags; a short canvas and few steps keep a random model's answers quick.
DECODE = ["--max-new-tokens", "12", "--steps", "4", "--alg", "entropy", "--batch-size", "4"]


def write_benchmarks(root: Path) -> None:
    """Two problems per task, each file in the format its loader reads (made up here)."""
    rows = {
        "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many now?", "answer": "3 + 4 = 7\n#### 7"},
                  {"question": "A box holds 6 eggs. How many in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"}],
        "math500": [{"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "answer": "\\frac{3}{4}", "unique_id": "a"},
                    {"problem": "Simplify $\\sqrt{16}$.", "answer": "4", "unique_id": "b"}],
        "aime24": [{"id": "1", "problem": "Find 5 * 5.", "answer": "025"}, {"id": "2", "problem": "Find 9.", "answer": "9"}],
        "aime25": [{"problem": "Find 3 + 3.", "answer": 6}, {"problem": "Find 2 * 7.", "answer": 14}],
        "amc23": [{"problem": "What is 10 / 4?", "answer": 2.5}, {"problem": "What is 27?", "answer": 27.0}],
    }
    for task, items in rows.items():
        (root / task).mkdir(parents=True)
        (root / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def run(*argv) -> None:
    assert cli([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """Steps 3-6 and 9-11, run once in a folder laid out as the README's; returns that folder."""
    import os

    root = tmp_path_factory.mktemp("journey")
    old_cwd, old_env = Path.cwd(), os.environ.pop("DREAMTUNE_EVAL_DATA", None)
    os.chdir(root)
    try:
        save_hf(tiny_lm(hidden_size=32, layers=2, heads=4, kv_heads=2, seed=1), Path("models/base"), dtype=torch.float32)
        Path("data").mkdir()
        Path("data/s1k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_rows(40)))
        write_benchmarks(Path("data/eval"))
        # 3-5: prepare, validate at the run's max_length, then a what-if at 16 (which must not replace it)
        run("data", "prepare", "--input", "data/s1k.jsonl", "--format", "generic", "--val-fraction", "0.1",
            "--seed", "42", "--out", "data/s1k_dream_format")
        run("data", "validate", "--data", "data/s1k_dream_format", "--tokenizer", "models/base", "--max-length", MAX_LENGTH)
        run("data", "validate", "--data", "data/s1k_dream_format", "--tokenizer", "models/base", "--max-length", 16)
        # 6: the real trainer, three steps
        run("train", "model.partial_pretrain=models/base",
            "data.train_files=[data/s1k_dream_format/train.parquet]", "data.val_files=[data/s1k_dream_format/val.parquet]",
            f"data.max_length={MAX_LENGTH}", "data.truncation=right", "data.train_batch_size=4",
            "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=3", "trainer.save_checkpoint_steps=3",
            "trainer.val_check_steps=3", "trainer.default_local_dir=checkpoints/exp1", "trainer.logger=['console']",
            "trainer.device=cpu")
        # 9-11, as the README writes them (no --data-dir: the files are in ./data/eval)
        run("compare", "--base", "models/base", "--tuned", "checkpoints/exp1/checkpoint-final", "--task", "gsm8k",
            "--n", "2", "--prompt-format", "chat", "--out", "results/compare.json", *DECODE)
        run("eval", "--model", "checkpoints/exp1/checkpoint-final", "--tasks", TASKS, "--prompt-format", "chat",
            "--out", "results/eval_results.json", "--grade-workers", "0", *DECODE)
        run("report", "checkpoints/exp1", "--eval", "results/eval_results.json", "--compare", "results/compare.json")
    finally:
        os.chdir(old_cwd)
        if old_env is not None:
            os.environ["DREAMTUNE_EVAL_DATA"] = old_env
    return root


def test_steps_9_10_write_the_readmes_files(journey):
    results = journey / "results"
    assert sorted(p.name for p in results.iterdir()) == ["compare.json", "eval_results.json",
                                                         "eval_results.samples.jsonl"]
    ev = json.loads((results / "eval_results.json").read_text())
    assert list(ev["tasks"]) == TASKS.split(",") and all(t["total"] == 2 for t in ev["tasks"].values())
    assert ev["data_dir"] == str(Path("data") / "eval") and ev["prompt_format"] == "chat"
    assert ev["decoding"]["sampler"] == "dream" and "threshold" not in ev["decoding"]
    cmp = json.loads((results / "compare.json").read_text())
    assert [r["answer"] for r in cmp["rows"]] == ["7", "12"] and cmp["tuned"] == "checkpoints/exp1/checkpoint-final"


def test_the_run_keeps_the_datas_validation_at_its_max_length(journey):
    data = journey / "data" / "s1k_dream_format"
    assert json.loads((data / "validation.json").read_text())["max_length"] == MAX_LENGTH  # the what-if went beside
    assert json.loads((data / "validation.max_length-16.json").read_text())["max_length"] == 16
    copy = journey / "checkpoints" / "exp1" / "data_validation.json"
    assert copy.read_text() == (data / "validation.json").read_text()


def test_step_11_report_reads_every_file_and_the_runs_validation(journey):
    md = (journey / "checkpoints" / "exp1" / "report" / "report.md").read_text()
    ev = json.loads((journey / "results" / "eval_results.json").read_text())
    for task, s in ev["tasks"].items():
        assert f"| exp1 | {task} | {100 * s['accuracy']:.1f}% | {s['correct']}/{s['total']} |" in md
    cmp = json.loads((journey / "results" / "compare.json").read_text())
    s = cmp["summary"]
    assert f"base {100 * s['base_accuracy']:.1f}% -> tuned {100 * s['tuned_accuracy']:.1f}%" in md
    assert f"tokenizer `{journey / 'models' / 'base'}`, max_length {MAX_LENGTH}" in md
    assert "No data validation report" not in md
    assert "## Notes" not in md  # nothing skipped, nothing missing


@pytest.mark.slow
def test_step_12_notebooks_on_the_readmes_layout(journey, monkeypatch):
    """analyze_results reads results/ holding both eval_results.json and compare.json side by side."""
    pytest.importorskip("nbclient", reason="pip install 'dreamtune[notebooks]'")
    from test_notebooks import _images, _text, execute

    monkeypatch.setenv("DREAMTUNE_RUN", str(journey / "checkpoints" / "exp1"))
    monkeypatch.setenv("DREAMTUNE_EVAL", str(journey / "results"))
    text = _text(execute("analyze_results.ipynb"))
    assert f"eval results: ['{journey / 'results' / 'eval_results.json'}']" in text
    assert f"comparisons: ['{journey / 'results' / 'compare.json'}']" in text
    assert "3 steps; final train loss" in text and "gsm8k" in text and "amc23" in text
    assert "== compare.json: base" in text

    monkeypatch.setenv("DREAMTUNE_DATA", str(journey / "data" / "s1k_dream_format"))
    outputs = execute("explore_data.ipynb")
    assert f"max_length {MAX_LENGTH}" in _text(outputs) or f"max_length': {MAX_LENGTH}" in _text(outputs)
    assert _images(outputs) == 1


def test_step_13_demo_page_is_built_for_the_tuned_model(journey, monkeypatch):
    gr = pytest.importorskip("gradio", reason="pip install 'dreamtune[demo]'")
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, blocks=self))
    monkeypatch.chdir(journey)
    run("demo", "--model", "checkpoints/exp1/checkpoint-final")
    assert isinstance(launched["blocks"], gr.Blocks) and launched["server_name"] == "127.0.0.1"
