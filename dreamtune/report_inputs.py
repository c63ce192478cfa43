"""The report's inputs, each read only when its schema is the one docs/artifacts.md gives it.

A file of another kind (a compare JSON passed as --eval, an eval results file as --compare, a truncated
or foreign JSON) is skipped with a note that says what it is and where it belongs, never read half-way.
A leaf, with dreamtune.report: nothing in the core imports it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dreamtune.grpo_config import METRICS as GRPO_METRICS

TRAIN_SERIES = ("loss", "lr", "grad_norm", "tokens_per_s")
# What only a GRPO step logs (its rows have TRAIN_SERIES too): the names are the recipe's own.
GRPO_SERIES = tuple(k for k in GRPO_METRICS if k not in TRAIN_SERIES)


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl in the order written (each has a "step"); a torn last line (a run
    still writing, or killed) is left out."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise NotADirectoryError(f"run directory '{run_dir}' is a file; pass a training run directory "
                                 "(trainer.default_local_dir, the one holding metrics.jsonl)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist; pass a training run directory "
                                "(trainer.default_local_dir, the one holding metrics.jsonl)")
    path = run_dir / "metrics.jsonl"
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not the run's metrics file; is '{run_dir}' a training run directory?")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is '{run_dir}' a training run directory (trainer.default_local_dir)?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (a damaged file?); the trainer writes it as JSON lines") from None
    rows = []
    for line in text.split("\n"):  # not splitlines: a JSON string may hold U+2028 as is
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # the last line of a run that is still writing (or was killed) may be cut short
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> dict:
    """{"train": {step, loss, lr, grad_norm, tokens_per_s: lists}, "val": {step, val_loss: lists}, "grpo": {step,
    and each GRPO_SERIES key any GRPO row has: lists}} from metrics.jsonl; "grpo" has no steps for an SFT run.
    A resumed run can log a step twice: the last row for a step wins."""
    train, val, grpo = {}, {}, {}
    for row in metrics_rows(run_dir):
        if "val_loss" in row:
            val[int(row["step"])] = row
        if "loss" in row:
            train[int(row["step"])] = row
        if "reward_mean" in row:  # a GRPO step
            grpo[int(row["step"])] = row
    if not train and not val:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no training steps yet; run the trainer first (or wait for its first step)")
    steps = sorted(train)
    out = {"train": {"step": steps}, "val": {"step": sorted(val), "val_loss": [float(val[s]["val_loss"]) for s in sorted(val)]}}
    for key in TRAIN_SERIES:
        out["train"][key] = [float(train[s][key]) if train[s].get(key) is not None else float("nan") for s in steps]
    out["grpo"] = {"step": sorted(grpo)}
    for key in GRPO_SERIES:  # a key no row has (kl without a KL term) is left out, not a series of NaN
        if any(r.get(key) is not None for r in grpo.values()):
            out["grpo"][key] = [float(grpo[s][key]) if grpo[s].get(key) is not None else float("nan") for s in sorted(grpo)]
    return out


def tenths(grpo: dict, keys=("reward_mean", "accuracy", "completion_length")) -> dict:
    """The mean of each key over the first and the last tenth of a GRPO run's steps (at least one step each):
    {"steps_per_tenth", "first": {"steps": [first, last], key: mean}, "last": {...}}. Keys the run has not
    logged are left out; NaN entries are skipped."""
    steps = grpo["step"]
    n = max(1, len(steps) // 10)
    out = {"steps_per_tenth": n}
    for name, part in (("first", slice(0, n)), ("last", slice(len(steps) - n, len(steps)))):
        block = {"steps": [steps[part][0], steps[part][-1]]}
        for key in keys:
            values = [v for v in grpo.get(key, [])[part] if not math.isnan(v)]
            if values:
                block[key] = sum(values) / len(values)
        out[name] = block
    return out


def _read_json(path: Path, what: str, notes: list[str]):
    """The JSON at `path`, or None with a note when it is missing or unreadable (optional inputs)."""
    path = Path(path)
    if not path.is_file():
        notes.append(f"{what} {path} not found: skipped")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{what} {path} is not valid JSON ({type(e).__name__}): skipped")
        return None


def read_config(run_dir: Path) -> dict:
    """A few settings of the run from config.yaml, flattened ({} when absent)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    keys = ["model.partial_pretrain", "data.train_files", "data.max_length", "data.truncation", "data.train_batch_size",
            "optim.lr", "optim.lr_scheduler", "trainer.total_training_steps", "trainer.total_epochs",
            "diffusion.time_reweighting", "model.lora_rank", "trainer.seed"]
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    if isinstance(trainer, dict) and trainer.get("stage") == "grpo":  # GRPO reads no SFT data: its own settings instead
        keys = ["model.partial_pretrain", "trainer.stage", "grpo.task", "grpo.prompts_file", "grpo.prompt_format",
                "data.train_batch_size", "grpo.num_generations", "grpo.num_iterations", "grpo.beta", "grpo.epsilon",
                "grpo.format_reward", "grpo.alg", "grpo.max_new_tokens", "grpo.temperature", "optim.lr",
                "optim.lr_scheduler", "trainer.total_training_steps", "trainer.total_epochs", "model.lora_rank",
                "trainer.seed"]
    out = {}
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[key] = node
    return out


def model_label(model: str) -> str:
    """A short name for a model path: its directory name, or the run's for RUN/checkpoint-* exports."""
    p = Path(str(model).rstrip("/"))
    if p.name.startswith("checkpoint") and p.parent.name:
        return p.parent.name
    return p.name or str(model)


def read_evals(paths: list[str], notes: list[str]) -> list[dict]:
    """[{"file", "label", "model", "tasks": {name: {accuracy, correct, total}}, "decoding", "time_s"}]."""
    evals = []
    for path in paths:
        data = _of_kind(Path(path), "eval", "eval results", notes)
        if data is None:
            continue
        evals.append({"file": str(path), "model": str(data.get("model", "")), "label": model_label(data.get("model", path)),
                      "tasks": {t: v for t, v in data["tasks"].items() if isinstance(v, dict) and "accuracy" in v},
                      "decoding": data.get("decoding") or {}, "time_s": data.get("time_s")})
    labels = [e["label"] for e in evals]
    for e in evals:  # two evals of models with the same name: tell them apart by file
        if labels.count(e["label"]) > 1:
            e["label"] = f"{e['label']} ({Path(e['file']).stem})"
    return evals


def kind_of(data) -> str | None:
    """Which dreamtune artifact a parsed JSON is, by its keys: "eval", "compare", "validation" or None."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("tasks"), dict) and "model" in data:
        return "eval"
    if isinstance(data.get("rows"), list) and "base" in data and "tuned" in data:
        return "compare"
    if "max_length" in data and "policies" in data and isinstance(data.get("total"), dict):
        return "validation"
    return None


_WHAT = {"eval": "eval results (pass it with --eval)", "compare": "a comparison (pass it with --compare)",
         "validation": "a data validation report (pass it with --validation)"}


def _of_kind(path: Path, want: str, what: str, notes: list[str]):
    """The JSON at `path` when it is a `want` artifact; else None with a note saying what it is."""
    data = _read_json(path, what, notes)
    if data is None:
        return None
    kind = kind_of(data)
    if kind != want:
        notes.append(f"{what} {path} is {_WHAT.get(kind, 'not a file dreamtune writes')}, not {_WHAT[want].split(' (')[0]}: skipped")
        return None
    return data


def read_compare(path, notes: list[str]) -> dict | None:
    """A `dreamtune compare` JSON, or None with a note."""
    return _of_kind(Path(path), "compare", "comparison", notes)


def read_validation(path, notes: list[str]) -> dict | None:
    """A `dreamtune data validate` report, or None with a note."""
    return _of_kind(Path(path), "validation", "data validation report", notes)


def read_data_summary(run_dir: Path, notes: list[str]) -> dict | None:
    """RUN/data_summary.json's `truncation` block (what the trainer's truncation policy did to the rows),
    or None when the run has none."""
    path = Path(run_dir) / "data_summary.json"
    if not path.is_file():
        return None
    data = _read_json(path, "data summary", notes)
    trunc = data.get("truncation") if isinstance(data, dict) else None
    if not isinstance(trunc, dict):
        if data is not None:
            notes.append(f"data summary {path} has no 'truncation' block: skipped")
        return None
    return trunc
