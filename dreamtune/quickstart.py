"""`dreamtune quickstart`: the whole journey on a tiny model on a laptop CPU, in a few minutes.

    dreamtune quickstart                          # arithmetic, into ./runs/quickstart
    dreamtune quickstart --out DIR --task sudoku --steps 600 --seed 1

What it does, with the real pieces of dreamtune at every stage:
  1. builds a tiny Dream-architecture model (`dreamtune.tiny.tiny_lm`) over the task's characters and
     writes it as the untrained "base" model (`dreamtune.export.save_hf`);
  2. makes a synthetic dataset with worked solutions (`dreamtune.tasks.synthetic.make_rows`), prepares it
     (`dreamtune.data_prepare.prepare`: train/val parquet + manifest) and validates it against the base model's
     tokenizer (`dreamtune.data_validate.validate`: validation.json + validation.png);
  3. trains with the real trainer (`dreamtune.train.train`);
  4. evaluates the base and the tuned model on held-out problems (never in the training data, written as a
     benchmark file eval_data/<task>/test.jsonl) with `dreamtune eval` and `dreamtune compare` themselves
     (the synthetic task is a registered task: bare-question prompts, exact grading);
  5. writes the report (`dreamtune report`: report.md, report.html, PNG figures).

Everything lands under --out (layout in docs/quickstart.md); the last lines printed say where, with the
two accuracies. The same --seed gives the same data, model, training and answers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dreamtune.atomic import write_json, write_jsonl
from dreamtune.cli import parser

DEFAULT_OUT = "runs/quickstart"
# Per task: the generator's options, rows, model size and training. Chosen by sweeps over size, batch,
# steps, learning rate and loss weighting (several seeds each): with these, a model from scratch reaches
# 85-100% on held-out problems on most seeds; fewer optimizer steps, or batches of 16, fall off a cliff.
# The loss is unweighted (diffusion.time_reweighting=none): Dream's 1/t weighting, made for fine-tuning
# a pretrained model, learned markedly slower from scratch in the same number of steps.
TASKS = {
    "arithmetic": {"opts": {"op": "add", "digits": 2}, "rows": 6000, "eval_rows": 100, "steps": 1500,
                   "batch": 32, "hidden": 64, "layers": 4, "lr": 3e-3},
    "sudoku": {"opts": {"blanks": 3}, "rows": 6000, "eval_rows": 100, "steps": 600,
               "batch": 32, "hidden": 128, "layers": 2, "lr": 2e-3},
}
# Characters of the chat template's role names ("user", "assistant"), so no prompt token is <unk>.
ROLE_CHARS = "abcdefghijklmnopqrstuvwxyz"


def cpu_threads(requested: int | None = None) -> int:
    """Torch threads: `requested`, else OMP_NUM_THREADS, else the cores this process may use that other
    work is not already using (by the 1-minute load average).

    Not simply every core: a tiny model's step is a few milliseconds of work per thread, and each waits
    for the slowest thread. Measured on a 2-core machine: 2 threads were ~10% faster than 1 when the
    machine was idle, and 5-15x slower while one other busy process shared it."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- data


def unique_rows(task: str, n: int, seed: int, opts: dict) -> list[dict]:
    """n rows with distinct prompts (small tasks repeat problems; a repeat would leak eval into train)."""
    from dreamtune.tasks.synthetic import make_rows

    seen, out, draw = set(), [], n
    for attempt in range(6):
        for r in make_rows(task, draw, seed + attempt, **opts):
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                out.append(r)
                if len(out) == n:
                    return out
        draw *= 2
    raise ValueError(f"task {task} with {opts} has fewer than {n} distinct problems; lower the number of rows")


# ----------------------------------------------------------------------------------------------- eval


def train_overrides(s: dict, base_dir, data_dir, run_dir, max_length: int, seed: int) -> list[str]:
    """The trainer settings of the quickstart (configs/tiny.yaml holds the arithmetic task's: a test keeps them
    equal): small batches and a high learning rate, for a tiny model trained from scratch."""
    return [
        f"model.partial_pretrain={base_dir}", "model.dtype=fp32", f"data.train_files=['{data_dir / 'train.parquet'}']",
        f"data.val_files=['{data_dir / 'val.parquet'}']", f"data.max_length={max_length}", "data.truncation=error",
        f"data.train_batch_size={s['batch']}", f"data.micro_batch_size_per_gpu={s['batch']}", "data.val_batches=2",
        f"optim.lr={s['lr']}", "optim.weight_decay=0.0", "optim.warmup_steps_ratio=0.05", "optim.min_lr_ratio=0.1",
        f"trainer.total_training_steps={s['steps']}", f"trainer.default_local_dir={run_dir}",
        f"trainer.seed={seed}", f"trainer.save_checkpoint_steps={s['steps']}", "trainer.keep_last=1",
        f"trainer.val_check_steps={max(1, s['steps'] // 10)}", "trainer.logger=['console']",
        "trainer.device=cpu", "diffusion.time_reweighting=none",
    ]


@contextlib.contextmanager
def _quiet():
    """The verbs' own output (tables, progress bars) out of the way of --quiet's one table."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def run(out: str = DEFAULT_OUT, task: str = "arithmetic", steps: int | None = None, seed: int = 0,
        threads: int | None = None, quiet: bool = False) -> dict:
    """The whole quickstart; returns the summary written to OUT/quickstart.json."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.data_prepare import prepare
    from dreamtune.data_validate import print_summary, validate
    from dreamtune.export import save_hf
    from dreamtune.tokenizer import load_tokenizer
    from dreamtune.tasks.synthetic import alphabet
    from dreamtune.tiny import tiny_lm
    from dreamtune.train import train

    if task not in TASKS:
        raise ValueError(f"unknown --task '{task}'; choose one of {', '.join(TASKS)}")
    s = dict(TASKS[task])
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be a positive number of optimizer steps, got {steps}")
        s["steps"] = steps
    root = Path(out).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file; give a directory")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(cpu_threads(threads))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t_start = time.time()
    timings = {}

    # 1. The base model: random weights, Dream's architecture, a character tokenizer.
    t0 = time.time()
    rows = unique_rows(task, s["rows"] + s["eval_rows"], seed, s["opts"])
    eval_rows, data_rows = rows[:s["eval_rows"]], rows[s["eval_rows"]:]  # eval problems never trained on
    lm = tiny_lm(alphabet=alphabet(task) + ROLE_CHARS, hidden_size=s["hidden"], layers=s["layers"], heads=4,
                 kv_heads=2, max_positions=256, seed=seed)
    base_dir = save_hf(lm, root / "base", dtype=torch.float32)
    tok = lm.tokenizer
    from dreamtune.data import encode_example

    longest = max(sum(map(len, encode_example(tok, r["prompt"], r["response"]))) for r in rows)
    max_length = longest + 4  # a few trailing eos to fill, as a real canvas has
    n_params = sum(p.numel() for p in lm.model.parameters())
    say(f"[1/5] base model: {n_params / 1e6:.2f}M parameters ({s['layers']} layers, hidden {s['hidden']}, "
        f"vocabulary {len(tok)}) -> {base_dir}; {torch.get_num_threads()} CPU thread(s)")
    timings["model"] = time.time() - t0

    # 2. Data: the real prepare (train/val split + manifest) and the real validation report.
    t0 = time.time()
    raw = root / "raw" / f"{task}.jsonl"
    write_jsonl(raw, data_rows)
    data_dir = root / "data"
    manifest = prepare(str(raw), str(data_dir), "generic", system_prompt=None, val_fraction=0.05, seed=seed,
                       overwrite=True)
    write_jsonl(root / "raw" / f"{task}_eval.jsonl", eval_rows)
    say(f"[2/5] data: {manifest['rows']['train']} train / {manifest['rows']['val']} val rows of {task} "
        f"{s['opts']} -> {data_dir}")
    # The tokenizer object as the trainer loads it (dreamtune.models.load_tokenizer): AutoTokenizer alone
    # would give this directory Qwen2's tokenizer class, whose pre-tokenizer splits text differently.
    report = validate(str(data_dir), load_tokenizer(base_dir), max_length, out=str(data_dir / "validation.json"))
    if not quiet:
        print_summary(report)
    if report["over_max_length"]:  # the lengths were measured on the same rows: this is a bug, not user error
        raise RuntimeError(f"{report['over_max_length']} rows exceed max_length {max_length}")
    timings["data"] = time.time() - t0

    # 3. Training: the real trainer, small batches and a high learning rate (a tiny model from scratch).
    t0 = time.time()
    run_dir = root / "tuned"
    overrides = train_overrides(s, base_dir, data_dir, run_dir, max_length, seed)
    if run_dir.exists():  # a fresh run each time: metrics.jsonl appends, and an old run would mix in
        import shutil

        shutil.rmtree(run_dir)
    say(f"[3/5] training {s['steps']} steps (batch {s['batch']}, max_length {max_length}) -> {run_dir}")
    cfg = load_config(None, overrides)
    train(cfg)  # copies data/validation.json into the run as data_validation.json
    timings["train"] = time.time() - t0

    # 4. Evaluation of both models on the held-out problems through the real verbs (`dreamtune eval` and
    #    `dreamtune compare`: their prompts, sampler, grader and writers), same decoding, same seed.
    t0 = time.time()
    from dreamtune.cli import main as cli_main

    prompt_len = max(len(encode_example(tok, r["prompt"], "")[0]) for r in rows)
    new_tokens = max_length - prompt_len
    bench_dir = root / "eval_data"  # the held-out problems as a benchmark file: DIR/<task>/test.jsonl
    write_jsonl(bench_dir / task / "test.jsonl",
                [{"id": str(i), "question": r["prompt"], "answer": str(r["answer"])} for i, r in enumerate(eval_rows)])
    decoding = ["--alg", "maskgit_plus", "--steps", str(new_tokens), "--max-new-tokens", str(new_tokens),
                "--temperature", "0", "--top-k", "0", "--top-p", "1", "--seed", str(seed), "--device", "cpu"]
    eval_dir = root / "eval"
    quietly = _quiet if quiet else contextlib.nullcontext
    for name, model in (("base", base_dir), ("tuned", run_dir / "checkpoint-final")):
        with quietly():
            rc = cli_main(["eval", "--model", str(model), "--tasks", task, "--data-dir", str(bench_dir),
                           "--system-prompt", "", "--batch-size", "50", "--out", str(eval_dir / f"{name}.json"), *decoding])
        if rc != 0:
            raise RuntimeError(f"dreamtune eval failed with exit code {rc}")
    with quietly():
        rc = cli_main(["compare", "--base", str(base_dir), "--tuned", str(run_dir / "checkpoint-final"), "--task", task,
                       "--n", str(len(eval_rows)), "--data-dir", str(bench_dir), "--system", "", "--batch-size", "50",
                       "--out", str(root / "compare.json"), *decoding])
    if rc != 0:
        raise RuntimeError(f"dreamtune compare failed with exit code {rc}")
    acc_base, acc_tuned = (json.loads((eval_dir / f"{n}.json").read_text())["tasks"][task]["accuracy"] for n in ("base", "tuned"))
    say(f"[4/5] eval on {len(eval_rows)} held-out problems: base {100 * acc_base:.0f}%, tuned {100 * acc_tuned:.0f}%")
    timings["eval"] = time.time() - t0

    # 5. The report, through the CLI (report is a leaf: nothing imports it).
    t0 = time.time()

    report_dir = root / "report"
    rc = cli_main(["report", str(run_dir), "--eval", str(eval_dir / "base.json"), "--eval", str(eval_dir / "tuned.json"),
                   "--compare", str(root / "compare.json"), "--validation", str(data_dir / "validation.json"),
                   "--out", str(report_dir)])
    if rc != 0:
        raise RuntimeError(f"dreamtune report failed with exit code {rc}")
    timings["report"] = time.time() - t0
    timings["total"] = time.time() - t_start

    summary = {
        "task": task, "options": s["opts"], "seed": seed, "steps": s["steps"],
        "accuracy": {"base": acc_base, "tuned": acc_tuned}, "eval_problems": len(eval_rows),
        "paths": {"base_model": str(base_dir), "data": str(data_dir), "validation": str(data_dir / "validation.json"),
                  "run": str(run_dir), "tuned_model": str(run_dir / "checkpoint-final"),
                  "eval_base": str(eval_dir / "base.json"), "eval_tuned": str(eval_dir / "tuned.json"),
                  "compare": str(root / "compare.json"), "report_md": str(report_dir / "report.md"),
                  "report_html": str(report_dir / "report.html")},
        "decoding": json.loads((eval_dir / "tuned.json").read_text())["decoding"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "created": _now(),
    }
    write_json(root / "quickstart.json", summary)
    say("[5/5] report written")
    say(_table(summary))
    return summary


def _table(summary: dict) -> str:
    p, a = summary["paths"], summary["accuracy"]
    rows = [
        ("base model (untrained)", p["base_model"]),
        ("prepared data", p["data"]),
        ("data validation", p["validation"]),
        ("training run", p["run"]),
        ("tuned model", p["tuned_model"]),
        (f"eval, base: {100 * a['base']:.0f}%", p["eval_base"]),
        (f"eval, tuned: {100 * a['tuned']:.0f}%", p["eval_tuned"]),
        ("base vs tuned", p["compare"]),
        ("report", p["report_md"]),
        ("report (one file)", p["report_html"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"quickstart: {summary['task']}, accuracy {100 * a['base']:.0f}% -> {100 * a['tuned']:.0f}% on "
             f"{summary['eval_problems']} held-out problems, {summary['timings_s']['total']:.0f}s"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    run = p["run"]
    lines += ["next:", f"  open {p['report_html']}",
              f"  dreamtune demo --model {p['tuned_model']} --max-new-tokens {summary['decoding']['max_new_tokens']}",
              f"  DREAMTUNE_DATA={p['data']} jupyter lab notebooks/explore_data.ipynb",
              f"  DREAMTUNE_RUN={run} DREAMTUNE_EVAL={Path(p['eval_tuned']).parent} jupyter lab notebooks/analyze_results.ipynb"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser("dreamtune quickstart", __doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--task", default="arithmetic", help="arithmetic (default) or sudoku")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the task's, ~500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the idle cores; OMP_NUM_THREADS is honoured)")
    ap.add_argument("--quiet", action="store_true", help="print only the final table")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.out).expanduser().absolute()
    made = [d for d in (root, *root.parents) if not d.exists()]  # the directories this run creates, innermost first
    try:
        summary = run(args.out, args.task, args.steps, args.seed, args.threads, quiet=args.quiet)
    except BaseException:
        for d in made:  # a run that failed before writing anything leaves no empty directories behind
            try:
                d.rmdir()  # only an empty one: a finished stage's output stays
            except OSError:
                break
        raise
    if args.quiet:
        print(_table(summary))
    return 0


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
