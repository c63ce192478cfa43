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
  4. evaluates the base and the tuned model on held-out problems (never in the training data) with the
     real sampler (`dreamtune.engine.generate`) and grader (`grade_synthetic`), writes eval results and
     a base-vs-tuned comparison in the formats of docs/artifacts.md;
  5. writes the report (`dreamtune report`: report.md, report.html, PNG figures).

Everything lands under --out (layout in docs/quickstart.md); the last lines printed say where, with the
two accuracies. The same --seed gives the same data, model, training and answers.
"""

from __future__ import annotations

import argparse
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


def evaluate_synthetic(model_dir: Path, task: str, rows: list[dict], sampler, max_new_tokens: int, seed: int,
                       out_path: Path, batch_size: int = 50) -> dict:
    """Generate for every row with the real sampler, grade with the real grader, write OUT (eval results)
    and OUT.samples.jsonl in the format of docs/artifacts.md (fields about benchmark files, such as
    data_dir, shots and config_id, are null: the problems come from the task generator); return the
    results dict."""
    import torch

    from dreamtune.engine import decode_answer, encode_prompt, generate, left_pad, record
    from dreamtune.models import load
    from dreamtune.tasks.synthetic import final_answer, grade_synthetic

    t0 = time.time()
    lm = load(model_dir, dtype="fp32")
    g = torch.Generator().manual_seed(seed)
    samples, gen_time = [], 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        input_ids, mask = left_pad([encode_prompt(lm.tokenizer, r["prompt"], chat=True) for r in chunk],
                                   lm.tokenizer.pad_token_id)
        tb = time.time()
        out = generate(lm, input_ids, mask, sampler, max_new_tokens=max_new_tokens, generator=g)
        dt = time.time() - tb
        gen_time += dt
        seqs = out.sequences  # [B, P + max_new_tokens]
        for k, r in enumerate(chunk):
            new = seqs[k, input_ids.shape[1]:].tolist()
            response, n_answer = decode_answer(lm, new, skip_special_tokens=True)
            correct = grade_synthetic(task, response, r["answer"])
            extracted = final_answer(response)
            seen = lm.tokenizer.decode(input_ids[k][mask[k].bool()].tolist(), skip_special_tokens=False)
            samples.append({"task": task, "id": str(start + k), "question": r["prompt"], "prompt": seen,
                            "response": response, "answer": r["answer"], "extracted": extracted,
                            "correct": correct, "stage": "exact" if correct else "none",
                            "how": "exact match of the Answer line", "error": None,
                            "answer_tokens": n_answer, "nfe": out.nfe,
                            "time_s": round(dt, 4), "config_id": None})
    n_ok = sum(s["correct"] for s in samples)
    n = max(len(samples), 1)
    samples_file = out_path.with_name(out_path.stem + ".samples.jsonl")
    results = {
        "model": str(model_dir),
        "tasks": {task: {"accuracy": n_ok / n, "correct": n_ok, "total": len(samples),
                         "by_stage": {"exact": n_ok, "numeric": 0, "math_verify": 0, "none": len(samples) - n_ok},
                         "no_answer": sum(s["extracted"] is None for s in samples), "errors": 0,
                         "mean_answer_tokens": sum(s["answer_tokens"] for s in samples) / n}},
        "decoding": record(sampler, max_new_tokens),
        "prompt_format": "chat", "system_prompt": None, "shots": None, "seed": seed, "limit": None,
        "data_dir": None, "batch_size": batch_size, "world_size": 1, "config_id": None,
        "time_s": round(time.time() - t0, 2), "generation_time_s": round(gen_time, 2),
        "samples": samples_file.name, "created": _now(),
    }
    write_jsonl(samples_file, samples)
    write_json(out_path, results)
    return results


def compare_results(base_json: Path, tuned_json: Path, out: Path) -> dict:
    """The base-vs-tuned comparison (docs/artifacts.md) from two eval results on the same problems."""
    def samples(p: Path):
        return [json.loads(line) for line in p.with_name(p.stem + ".samples.jsonl").read_text().splitlines()]

    base, tuned = json.loads(base_json.read_text()), json.loads(tuned_json.read_text())
    rows = [{"prompt": b["prompt"], "answer": b["answer"], "id": b["id"], "base": b["response"], "tuned": t["response"],
             "base_correct": b["correct"], "tuned_correct": t["correct"], "base_extracted": b["extracted"],
             "tuned_extracted": t["extracted"]}
            for b, t in zip(samples(base_json), samples(tuned_json))]
    task = next(iter(tuned["tasks"]))
    cmp = {"base": base["model"], "tuned": tuned["model"], "decoding": tuned["decoding"], "seed": tuned["seed"],
           "prompt_format": tuned["prompt_format"], "task": task, "rows": rows,
           "summary": {"base_accuracy": base["tasks"][task]["accuracy"],
                       "tuned_accuracy": tuned["tasks"][task]["accuracy"]},
           "time_s": {"base": base["generation_time_s"], "tuned": tuned["generation_time_s"]}, "created": _now()}
    write_json(out, cmp)
    return cmp


# ----------------------------------------------------------------------------------------------- the run


def run(out: str = DEFAULT_OUT, task: str = "arithmetic", steps: int | None = None, seed: int = 0,
        threads: int | None = None, quiet: bool = False) -> dict:
    """The whole quickstart; returns the summary written to OUT/quickstart.json."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.engine import DreamSampler, record
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
    overrides = [
        f"model.partial_pretrain={base_dir}", f"data.train_files=['{data_dir / 'train.parquet'}']",
        f"data.val_files=['{data_dir / 'val.parquet'}']", f"data.max_length={max_length}",
        f"data.train_batch_size={s['batch']}", f"data.micro_batch_size_per_gpu={s['batch']}", "data.val_batches=2",
        f"optim.lr={s['lr']}", "optim.weight_decay=0.0", "optim.warmup_steps_ratio=0.05", "optim.min_lr_ratio=0.1",
        f"trainer.total_training_steps={s['steps']}", f"trainer.default_local_dir={run_dir}",
        f"trainer.seed={seed}", f"trainer.save_checkpoint_steps={s['steps']}", "trainer.keep_last=1",
        f"trainer.val_check_steps={max(1, s['steps'] // 10)}", "trainer.logger=['console']",
        "trainer.device=cpu", "diffusion.time_reweighting=none",
    ]
    if run_dir.exists():  # a fresh run each time: metrics.jsonl appends, and an old run would mix in
        import shutil

        shutil.rmtree(run_dir)
    say(f"[3/5] training {s['steps']} steps (batch {s['batch']}, max_length {max_length}) -> {run_dir}")
    cfg = load_config(None, overrides)
    train(cfg)  # copies data/validation.json into the run as data_validation.json
    timings["train"] = time.time() - t0

    # 4. Evaluation of both models on the held-out problems, same decoding, same seed.
    t0 = time.time()
    prompt_len = max(len(encode_example(tok, r["prompt"], "")[0]) for r in rows)
    new_tokens = max_length - prompt_len
    sampler = DreamSampler(alg="maskgit_plus", steps=new_tokens, temperature=0.0)
    eval_dir = root / "eval"
    evaluate_synthetic(base_dir, task, eval_rows, sampler, new_tokens, seed, eval_dir / "base.json")
    evaluate_synthetic(run_dir / "checkpoint-final", task, eval_rows, sampler, new_tokens, seed, eval_dir / "tuned.json")
    cmp = compare_results(eval_dir / "base.json", eval_dir / "tuned.json", root / "compare.json")
    acc_base, acc_tuned = cmp["summary"]["base_accuracy"], cmp["summary"]["tuned_accuracy"]
    say(f"[4/5] eval on {len(eval_rows)} held-out problems: base {100 * acc_base:.0f}%, tuned {100 * acc_tuned:.0f}%")
    timings["eval"] = time.time() - t0

    # 5. The report, through the CLI (report is a leaf: nothing imports it).
    t0 = time.time()
    from dreamtune.cli import main as cli_main

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
        "decoding": record(sampler, new_tokens),
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
    summary = run(args.out, args.task, args.steps, args.seed, args.threads, quiet=args.quiet)
    if args.quiet:
        print(_table(summary))
    return 0


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
