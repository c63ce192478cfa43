"""`dreamtune report`: figures, a results table, base/tuned examples and the data summary of a run.

    dreamtune report RUN_DIR [--eval FILE ...] [--compare FILE] [--validation FILE] [--out DIR]

Reads only the artifacts of docs/artifacts.md, each only when its keys are those of its kind
(dreamtune.report_inputs): RUN_DIR/metrics.jsonl (required) and RUN_DIR/config.yaml, eval results JSONs
(`dreamtune eval`), a comparison JSON (`dreamtune compare`), a data validation report (`dreamtune data
validate`; default RUN_DIR/data_validation.json, the trainer's copy) and the truncation counts in
RUN_DIR/data_summary.json when the trainer wrote them. Writes to --out (default RUN_DIR/report):

  report.md      the report, with the PNG figures beside it
  report.html    the same, one self-contained file (figures inlined as base64): open it, mail it
  report.json    the numbers behind every figure and table (what the figures plot, exactly)
  loss.png  lr.png  grad_norm.png  tokens_per_s.png  accuracy.png  validation.png
  reward.png  rollout_accuracy.png  kl.png  clip_fraction.png  completion_length.png  step_time.png
                 (a GRPO run: reward and share of correct rollouts per step, the KL term, the clipped share,
                 completion length and the rollout/update time of each step; a table of the first vs the
                 last tenth of the steps)

Optional inputs that are missing or unreadable are skipped with a note (printed and in the report);
a missing RUN_DIR or metrics.jsonl is an error. The report directory is replaced whole: it appears
complete or not at all. A leaf: it reads files, and nothing in dreamtune imports it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dreamtune.atomic import io_error, replace_dir, temp_dir_beside
from dreamtune.cli import parser
from dreamtune.report_render import render_html, render_markdown
from dreamtune.report_inputs import (  # noqa: F401  (read_metrics, model_label, the series names: part of this leaf's API)
    GRPO_SERIES,
    TRAIN_SERIES,
    model_label,
    read_compare,
    read_config,
    read_data_summary,
    read_evals,
    read_metrics,
    read_validation,
    tenths,
)

# Train-loss points are noisy (one micro-batch of random noise levels each): the figure adds a
# moving average over this many steps so the trend is readable.
SMOOTH = 20
N_EXAMPLES = 6
# A GRPO run's figures, in the order the report shows them (accuracy.png is the eval results' bar chart).
GRPO_FIGURES = ("reward.png", "rollout_accuracy.png", "kl.png", "clip_fraction.png", "completion_length.png",
                "step_time.png")


# ----------------------------------------------------------------------------------------------- figures


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state (Agg renders the PNG)

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def build_figures(metrics: dict, evals: list[dict]) -> dict:
    """{file name: matplotlib Figure}: the lines and bars are exactly the series in `metrics`/`evals`."""
    tr, va = metrics["train"], metrics["val"]
    grpo = bool(metrics["grpo"]["step"])
    figs = {}
    if tr["step"] or va["step"]:
        fig, ax = _figure("loss", "loss")
        if tr["step"]:
            ax.plot(tr["step"], tr["loss"], color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss")
            if len(tr["step"]) > SMOOTH:
                ax.plot(tr["step"], moving_average(tr["loss"], SMOOTH), color="tab:blue",
                        label=f"train loss (mean of {SMOOTH})")
        if va["step"]:
            ax.plot(va["step"], va["val_loss"], color="tab:orange", marker="o", label="validation loss")
        if all(v > 0 for v in tr["loss"] + va["val_loss"]):
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")  # a loss falls by orders of magnitude; plain numbers on the axis, not 10^x
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend()
        figs["loss.png"] = fig
    for key, title, ylabel in (("lr", "learning rate", "lr"), ("grad_norm", "gradient norm (before clipping)", "norm"),
                               ("tokens_per_s", "rollout throughput (canvas tokens)" if grpo else "throughput", "tokens/s")):
        if tr["step"]:
            fig, ax = _figure(title, ylabel)
            ax.plot(tr["step"], tr[key], color="tab:green", linewidth=1, label=key)
            figs[f"{key}.png"] = fig
    if evals:
        from matplotlib.figure import Figure

        tasks = sorted({t for e in evals for t in e["tasks"]})
        fig = Figure(figsize=(7, 3.6), layout="constrained")
        ax = fig.add_subplot()
        width = 0.8 / len(evals)
        for i, e in enumerate(evals):
            xs = [k + (i - (len(evals) - 1) / 2) * width for k in range(len(tasks))]
            ys = [100 * e["tasks"][t]["accuracy"] if t in e["tasks"] else 0.0 for t in tasks]
            bars = ax.bar(xs, ys, width, label=e["label"])
            ax.bar_label(bars, labels=[f"{y:.0f}%" if t in e["tasks"] else "n/a" for y, t in zip(ys, tasks)], fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set(title="accuracy per task and model", ylabel="accuracy (%)", ylim=(0, 110))
        ax.legend()
        figs["accuracy.png"] = fig
    if grpo:
        figs.update(grpo_figures(metrics["grpo"]))
    return figs


def _raw_and_smoothed(ax, steps, values, color, label):
    """A noisy per-step series: the points, and its moving average once the run is long enough to need one."""
    smooth = len(steps) > SMOOTH
    ax.plot(steps, values, color=color, alpha=0.35 if smooth else 1.0, linewidth=0.8 if smooth else 1, label=label)
    if smooth:
        ax.plot(steps, moving_average(values, SMOOTH), color=color, label=f"{label} (mean of {SMOOTH})")


def grpo_figures(g: dict) -> dict:
    """{file name: Figure} of a GRPO run (read_metrics' "grpo"): each figure only for the keys the run logged."""
    steps, figs = g["step"], {}
    fig, ax = _figure("reward per step (mean over the step's rollouts)", "reward")
    if "reward_std" in g:  # the spread of the step's rollouts: how much signal its advantages carry
        ax.fill_between(steps, [m - d for m, d in zip(g["reward_mean"], g["reward_std"])],
                        [m + d for m, d in zip(g["reward_mean"], g["reward_std"])], color="tab:purple", alpha=0.15,
                        linewidth=0, label="reward_mean ± reward_std")
    _raw_and_smoothed(ax, steps, g["reward_mean"], "tab:purple", "reward_mean")
    ax.legend()
    figs["reward.png"] = fig
    if "accuracy" in g:
        fig, ax = _figure("rollout accuracy (share of the step's rollouts graded correct)", "correct (%)")
        _raw_and_smoothed(ax, steps, [100 * a for a in g["accuracy"]], "tab:red", "accuracy")
        ax.set_ylim(0, 100)
        ax.legend()
        figs["rollout_accuracy.png"] = fig
    for key, title, ylabel in (("kl", "KL to the reference (k3 estimate, per token)", "KL"),
                               ("clip_fraction", "clipped share of completion tokens", "fraction"),
                               ("completion_length", "completion length (tokens up to the first stop)", "tokens")):
        if key in g:
            fig, ax = _figure(title, ylabel)
            ax.plot(steps, g[key], color="tab:green", linewidth=1, label=key)
            figs[f"{key}.png"] = fig
    if "rollout_s" in g or "update_s" in g:
        fig, ax = _figure("time per step", "seconds")
        for key, color in (("rollout_s", "tab:blue"), ("update_s", "tab:orange")):
            if key in g:
                ax.plot(steps, g[key], color=color, linewidth=1, label=key)
        ax.legend()
        figs["step_time.png"] = fig
    return figs


# ----------------------------------------------------------------------------------------------- the document
# The report is a list of blocks rendered twice, as Markdown and as HTML, so the two never disagree.


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _pick_examples(rows: list[dict], k: int) -> list[dict]:
    """Rows that show the fine-tuning's effect first (tuned right, base wrong), then the rest, in order."""
    rank = lambda r: 0 if r.get("tuned_correct") and not r.get("base_correct") else 1  # noqa: E731
    return sorted(rows, key=rank)[:k]


def build_document(run_dir: Path, metrics: dict, config: dict, evals: list[dict], compare: dict | None,
                   validation: dict | None, images: list[str], notes: list[str],
                   truncation: dict | None = None) -> list[tuple]:
    tr, va = metrics["train"], metrics["val"]
    grpo = bool(metrics["grpo"]["step"])
    doc = [("h1", f"dreamtune report: {run_dir.name}"), ("p", f"Run directory: `{run_dir}`")]

    doc.append(("h2", "Training"))
    rows = []
    if tr["step"]:
        rows += [("optimizer steps", tr["step"][-1]), ("final train loss", f"{tr['loss'][-1]:.4f}"),
                 (f"final train loss (mean of last {min(SMOOTH, len(tr['loss']))})",
                  f"{sum(tr['loss'][-SMOOTH:]) / len(tr['loss'][-SMOOTH:]):.4f}"),
                 ("median rollout tokens/s" if grpo else "median tokens/s",
                  f"{sorted(tr['tokens_per_s'])[len(tr['tokens_per_s']) // 2]:,.0f}")]
    if va["step"]:
        rows += [("final validation loss", f"{va['val_loss'][-1]:.4f} (step {va['step'][-1]})"),
                 ("best validation loss", f"{min(va['val_loss']):.4f}")]
    rows += [(k, _fmt(v)) for k, v in config.items()]
    doc.append(("table", ["", "value"], rows))
    for name in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
        if name in images:
            doc.append(("img", name, name.removesuffix(".png")))
    if grpo:
        doc += _grpo_blocks(metrics["grpo"], images)

    doc.append(("h2", "Results"))
    if evals:
        table = []
        for e in evals:
            d = e["decoding"]
            how = ", ".join(f"{k} {d[k]}" for k in ("alg", "steps", "max_new_tokens", "temperature") if k in d)
            for task, r in sorted(e["tasks"].items()):
                table.append((e["label"], task, f"{100 * r['accuracy']:.1f}%", f"{r.get('correct', '?')}/{r.get('total', '?')}",
                              how, Path(e["file"]).name))
        doc.append(("table", ["model", "task", "accuracy", "correct", "decoding", "file"], table))
        if "accuracy.png" in images:
            doc.append(("img", "accuracy.png", "accuracy"))
    else:
        doc.append(("p", "No eval results given (--eval FILE): no accuracy table."))
    if compare:
        s = compare.get("summary") or {}
        if s.get("base_accuracy") is not None and s.get("tuned_accuracy") is not None:
            doc.append(("p", f"Comparison on the same problems and decoding: base {100 * s['base_accuracy']:.1f}% -> "
                             f"tuned {100 * s['tuned_accuracy']:.1f}%."))

    doc.append(("h2", "Examples: base vs tuned"))
    if compare and compare.get("rows"):
        d = compare.get("decoding") or {}
        doc.append(("p", f"Base `{compare.get('base', '?')}`, tuned `{compare.get('tuned', '?')}`; decoding: "
                         + (", ".join(f"{k} {v}" for k, v in d.items() if v is not None) or "not recorded") + "."))
        doc.append(("examples", _pick_examples(compare["rows"], N_EXAMPLES)))
    else:
        doc.append(("p", "No comparison given (--compare FILE): no examples."))

    doc.append(("h2", "Training data"))
    if truncation:
        doc.append(("p", _truncation_text(truncation, config)))
    if validation:
        v = validation
        doc.append(("p", f"{v.get('rows', '?')} rows, tokenizer `{v.get('tokenizer', '?')}`, max_length {v.get('max_length', '?')}: "
                         f"{v.get('over_max_length', '?')} rows over max_length, {v.get('answer_lost_right_truncation', '?')} "
                         "would lose their final answer to right truncation."))
        trained_at = config.get("data.max_length")
        if trained_at is not None and v.get("max_length") is not None and trained_at != v["max_length"]:
            doc.append(("p", f"Note: this report was measured at max_length {v['max_length']}; the run trained at "
                             f"data.max_length={trained_at}."))
        stats = [(k, *[_fmt(v[k].get(s)) for s in ("min", "median", "mean", "p90", "p99", "max")])
                 for k in ("prompt", "response", "total") if isinstance(v.get(k), dict)]
        if stats:
            doc.append(("table", ["tokens", "min", "median", "mean", "p90", "p99", "max"], stats))
        pol = v.get("policies") or {}
        if pol:
            doc.append(("table", ["truncation policy", "effect"],
                        [(name, ", ".join(f"{k} {_fmt(x)}" for k, x in p.items() if x is not None)) for name, p in pol.items()]))
        if "validation.png" in images:
            doc.append(("img", "validation.png", "token lengths"))
    elif grpo:  # its prompts are grpo.prompts_file's, which `dreamtune data validate` does not measure
        doc.append(("p", "A GRPO run: its prompts are grpo.prompts_file's (in the table above)."))
    else:
        doc.append(("p", "No data validation report (--validation FILE, or RUN/data_validation.json)."))

    if notes:
        doc.append(("h2", "Notes"))
        doc.append(("list", notes))
    return doc


def _grpo_blocks(g: dict, images: list[str]) -> list[tuple]:
    """The GRPO section: the first vs the last tenth of the steps (tenths()), then the GRPO figures."""
    t = tenths(g)
    span = lambda b: f"step {b['steps'][0]}" if b["steps"][0] == b["steps"][1] else f"steps {b['steps'][0]}-{b['steps'][1]}"  # noqa: E731
    blocks = [("h2", "Reinforcement learning (GRPO)"),
              ("p", f"{len(g['step'])} GRPO steps. Each number is a step's mean over its rollouts, averaged over the "
                    f"first and the last tenth of the steps ({t['steps_per_tenth']} each).")]
    rows = []
    for key, label, fmt, diff in (("reward_mean", "reward", "{:.3f}".format, "{:+.3f}".format),
                                  ("accuracy", "rollout accuracy", lambda v: f"{100 * v:.1f}%",
                                   lambda v: f"{100 * v:+.1f} points"),
                                  ("completion_length", "completion length (tokens)", "{:.1f}".format, "{:+.1f}".format)):
        if key in t["first"] and key in t["last"]:
            first, last = t["first"][key], t["last"][key]
            rows.append((label, fmt(first), fmt(last), diff(last - first)))
    blocks.append(("table", ["", f"first tenth ({span(t['first'])})", f"last tenth ({span(t['last'])})", "change"], rows))
    blocks += [("img", name, name.removesuffix(".png")) for name in GRPO_FIGURES if name in images]
    return blocks


def _truncation_text(t: dict, config: dict) -> str:
    """One sentence on what the trainer's truncation policy did (RUN/data_summary.json's `truncation`)."""
    policy = t.get("policy", config.get("data.truncation", "?"))
    parts = []
    for split in ("train", "val"):
        s = t.get(split)
        if isinstance(s, dict):
            done = [f"{s[k]} {k.replace('_', ' ')}" for k in ("truncated", "dropped", "answer_lost") if s.get(k) is not None]
            parts.append(f"{split}: {', '.join(done) or 'nothing cut'} of {s.get('rows', '?')} rows")
    return (f"The trainer's truncation (data.truncation={policy}, max_length {t.get('max_length', config.get('data.max_length', '?'))}) "
            + ("; ".join(parts) if parts else "recorded no counts") + ".")


# ----------------------------------------------------------------------------------------------- writing


def _validation_png(validation: dict | None, validation_path: Path | None) -> Path | None:
    """The histogram `dreamtune data validate` wrote beside its report, if it is still there."""
    if not validation:
        return None
    # its own PNG only: beside it under the same name (RUN/data_validation.png, validation.max_length-16.png),
    # or where it was written; a validation.png beside a side file belongs to another report
    candidates = [validation_path.with_suffix(".png")] if validation_path is not None else []
    if validation.get("histogram"):
        candidates.append(Path(validation["histogram"]))
    return next((p for p in candidates if p.is_file()), None)


def write_report(run_dir, evals=(), compare=None, validation=None, out=None) -> Path:
    """Build the whole report into a temporary directory, then put it in place of `out`; return `out`."""
    run_dir = Path(run_dir).expanduser()
    notes: list[str] = []
    metrics = read_metrics(run_dir)
    config = read_config(run_dir)
    eval_data = read_evals(list(evals), notes)
    compare_data = read_compare(compare, notes) if compare else None
    if validation is None and (run_dir / "data_validation.json").is_file():
        validation = run_dir / "data_validation.json"  # the trainer's copy of the data's report
    validation_path = Path(validation) if validation else None
    validation_data = read_validation(validation_path, notes) if validation_path else None
    truncation = read_data_summary(run_dir, notes)
    out = Path(out).expanduser() if out else run_dir / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").exists())):
        raise ValueError(f"--out {out} exists and is not a report directory; choose another --out")

    figures = build_figures(metrics, eval_data)
    tmp = temp_dir_beside(out)
    try:
        images = {}
        for name, fig in figures.items():
            fig.savefig(tmp / name, format="png", dpi=100)
            images[name] = (tmp / name).read_bytes()
        png = _validation_png(validation_data, validation_path)
        if png is not None:
            shutil.copyfile(png, tmp / "validation.png")
            images["validation.png"] = (tmp / "validation.png").read_bytes()
        doc = build_document(run_dir, metrics, config, eval_data, compare_data, validation_data, list(images), notes,
                             truncation)
        (tmp / "report.md").write_text(render_markdown(doc))
        (tmp / "report.html").write_text(render_html(doc, images))
        series = {"train": metrics["train"], "val": metrics["val"],
                  "accuracy": {e["label"]: {t: r["accuracy"] for t, r in e["tasks"].items()} for e in eval_data}}
        summary = {"run": str(run_dir), "series": series, "figures": sorted(images), "notes": notes, "config": config}
        if metrics["grpo"]["step"]:  # an SFT run's report.json keeps exactly its keys
            series["grpo"] = metrics["grpo"]
            summary["grpo_tenths"] = tenths(metrics["grpo"])
        (tmp / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        replace_dir(tmp, out)
    except OSError as e:  # a full disk: named as --out, not its temporary name
        raise (io_error(e, out, tmp) or e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("dreamtune report", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--eval", action="append", default=[], metavar="FILE", help="eval_results.json (repeatable)")
    p.add_argument("--compare", default=None, metavar="FILE", help="comparison JSON from dreamtune compare")
    p.add_argument("--validation", default=None, metavar="FILE",
                   help="data validation JSON (default RUN_DIR/data_validation.json when present)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default RUN_DIR/report)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = write_report(args.run_dir, args.eval, args.compare, args.validation, args.out)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'} (self-contained)")
    return 0


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
