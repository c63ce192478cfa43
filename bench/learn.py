#!/usr/bin/env python3
"""Proof that it learns: a small Dream-architecture model, trained from random weights by dreamtune's own
trainer, solves a synthetic reasoning task with worked solutions; graded as `dreamtune eval` grades, before
and after training, for every sampler and for two time reweightings.

    PYTHONPATH=. python3 bench/learn.py           # the H200 run: 4x4 sudoku, 10 blanks (budget 500 s, a 9-minute slot)
    PYTHONPATH=. python3 bench/learn.py --tiny    # the same pipeline on a CPU in ~2 minutes (2-digit addition)
    PYTHONPATH=. python3 bench/learn.py --tiny --steps 150   # a fixed step count: the same figures on every run
    PYTHONPATH=. python3 bench/learn.py --task arithmetic --task-opts '{"op":"mul","digits":3,"digits2":3}' --name learn_mul

What runs, in order (every piece is dreamtune's own):
  1. data: rows of a synthetic task of the task registry (`dreamtune.tasks.make_rows`), with worked steps,
     de-duplicated by prompt and split into train / val (parquet) and held-out problems never trained on;
  2. model: `dreamtune.tiny.tiny_lm` (Qwen2 = Dream's architecture, bidirectional, shifted logits) over the
     task's characters, saved with `dreamtune.export.save_hf` as the random "base";
  3. base evaluation: every sampler at temperature 0 (origin, maskgit_plus, topk_margin, entropy with
     steps = max_new_tokens, i.e. ~one token per step; and alg="fast", the block-wise threshold sampler with
     the KV cache), through the code `dreamtune eval` runs: the registry's chat prompt (the bare question),
     `engine.generate_batches` (batches by prompt length, seeded per batch) and `grading.grade_many`;
  4. calibration: a few dozen real trainer steps (alone, and on a GPU also two runs at once) to measure
     the step time; the number of steps is then chosen so that everything fits in --budget-s (--steps N
     instead: a fixed number, so that the figures repeat);
  5. training: `dreamtune.train.train(load_config(None, overrides))`, once per time reweighting
     (`diffusion.time_reweighting` original = 1/t and cart), same data, seed and steps; on a GPU the two
     runs share it at once when the calibration says that gives more steps each;
  6. evaluation of both trained models as in 3, plus each model's unweighted masked cross-entropy on the
     val rows (so original and cart, whose training losses weigh tokens differently, compare fairly);
  7. learn.json, learn_loss.png (training CE, val loss, accuracy) and learn_samples.jsonl (learn_tiny.* with
     --tiny) into --out, else $OUT, else bench/results/; a compact table printed last.

Goal: >= 95% exact match on a non-trivial task, the fast sampler within 1 point of the best
one-token-per-step sampler. Training runs live in a temporary work directory (--work to keep them).
"""

from __future__ import annotations

import time

T_START = time.time()  # the budget counts from here, before the heavy imports

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

import learn_common as L  # noqa: E402  rows, files, trainer runs and evaluation, shared with grpo_learn.py
from dreamtune import tasks  # noqa: E402
from dreamtune.sampling import DREAM_ALGS as ONE_PER_STEP  # noqa: E402  the one-token-per-step samplers

ALL_SAMPLERS = (*ONE_PER_STEP, "fast")

# Defaults for the H200 run and for --tiny (CPU). Every value is also a command-line option.
GPU_DEFAULTS = dict(
    task="sudoku", task_opts={"blanks": 10},
    train_rows=200_000, val_rows=1_000, eval_rows=1_000,
    hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048,
    batch=256, micro_batch=256, lr=1e-3, warmup=0.03, min_lr_ratio=0.05, weight_decay=0.01,
    budget_s=500.0, max_steps=30_000, min_steps=200, calib_steps=40, eval_batch=1_000,
    reweightings="original,cart", parallel="auto",
)
TINY_DEFAULTS = dict(
    task="arithmetic", task_opts={"op": "add", "digits": 2},
    train_rows=6_000, val_rows=100, eval_rows=50,
    hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256,
    batch=32, micro_batch=32, lr=3e-3, warmup=0.05, min_lr_ratio=0.05, weight_decay=0.01,
    budget_s=120.0, max_steps=5_000, min_steps=30, calib_steps=8, eval_batch=50,
    reweightings="original,cart", parallel="off",
)


def say(msg: str) -> None:
    print(f"[learn {time.time() - T_START:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- outputs


def plot(runs: dict, acc: dict, path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no PNG"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"original": "tab:blue", "cart": "tab:orange", "linear": "tab:green", "none": "tab:red"}
    for name, info in runs.items():
        rows = [m for m in info["metrics"] if "ce" in m]
        if not rows:
            continue
        ema, sm = None, []
        for m in rows:
            ema = m["ce"] if ema is None else 0.97 * ema + 0.03 * m["ce"]
            sm.append(ema)
        c, xs = colors.get(name), [m["step"] for m in rows]
        axes[0].plot(xs, [m["ce"] for m in rows], color=c, alpha=0.15, lw=0.6)
        axes[0].plot(xs, sm, color=c, lw=1.6, label=f"{name} (EMA)")
        val = [m for m in info["metrics"] if "val_loss" in m]
        if val:
            axes[1].plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", color=c, ms=3, label=name)
    for ax, ylabel in zip(axes[:2], ["masked-token cross-entropy (train)", "val loss (each run's own weighting)"]):
        ax.set(yscale="log", xlabel="optimizer step", ylabel=ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    algs = list(next(iter(acc.values())).keys()) if acc else []
    width = 0.8 / max(1, len(acc))
    for i, (name, res) in enumerate(acc.items()):
        axes[2].bar([j + i * width for j in range(len(algs))], [100 * res[x]["accuracy"] if x in res else 0 for x in algs],
                    width, label=name, color=colors.get(name, "tab:gray"))
    axes[2].set_xticks([j + width * (len(acc) - 1) / 2 for j in range(len(algs))])
    axes[2].set_xticklabels(algs, rotation=20)
    axes[2].axhline(95, color="k", ls="--", lw=0.8)
    axes[2].set(ylabel="exact match on held-out problems (%)", ylim=(0, 100))
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def summarize(result: dict, samplers: list[str], reweightings: list[str]) -> dict | None:
    """The best one-token-per-step sampler of the best run, and the fast setting reported beside it: the one
    with fewest forward passes among those within 1 point of it, else the most accurate."""
    evals = {rw: result["runs"][rw].get("eval", {}) for rw in reweightings}
    best = None
    for rw in reweightings:
        for alg in (x for x in ONE_PER_STEP if x in evals[rw]):
            if best is None or evals[rw][alg]["accuracy"] > best[2]:
                best = (rw, alg, evals[rw][alg]["accuracy"])
    tried = [x for x in samplers if x.startswith("fast") and best is not None and x in evals[best[0]]]
    if not tried:
        return None
    rw, alg, acc = best
    ev = evals[rw]
    within = [x for x in tried if ev[x]["accuracy"] >= acc - 0.01]
    pick = min(within, key=lambda x: ev[x]["nfe_per_batch"]) if within else max(tried, key=lambda x: ev[x]["accuracy"])
    fast = ev[pick]
    return {
        "best_run": rw, "best_one_per_step": alg, "best_one_per_step_accuracy": acc,
        "fast_setting": pick, "fast_accuracy": fast["accuracy"],
        "fast_speedup_nfe": ev[alg]["nfe_per_batch"] / max(fast["nfe_per_batch"], 1e-9),
        "fast_speedup_wall": ev[alg]["wall_s"] / max(fast["wall_s"], 1e-9),
        "fast_settings": {x: {k: ev[x][k] for k in ("accuracy", "nfe_per_batch", "wall_s")} for x in tried},
        "goal_accuracy": acc >= 0.95, "goal_fast": fast["accuracy"] >= acc - 0.01,
        "by_reweighting": {r: max((evals[r][x]["accuracy"] for x in ONE_PER_STEP if x in evals[r]), default=None)
                           for r in reweightings},
    }


def table(result: dict) -> str:
    runs, d, m, args = result.get("runs", {}), result["data"], result["model"], result["args"]
    evals = {"base": result.get("base_eval", {}), **{n: runs[n].get("eval", {}) for n in runs}}
    lines = [f"learn: {result['task']['name']}, {m['params'] / 1e6:.1f}M params ({m['layers']}x{m['hidden']}), "
             f"{result.get('steps', '?')} steps x batch {args['batch']} per run ({result.get('mode', '?')}), "
             f"{d['eval_rows']} held-out problems, {d['new_tokens']} new tokens, {result['device']}",
             f"{'sampler':<18}" + "".join(f"{n + ' acc':>14}" for n in evals) + f"{'nfe':>8}{'wall s':>9}"]
    best_run = result.get("summary", {}).get("best_run", list(evals)[-1])
    for alg in args["samplers"]:
        row = f"{alg:<18}" + "".join(f"{100 * e[alg]['accuracy']:>13.1f}%" if alg in e else f"{'-':>14}" for e in evals.values())
        r = evals.get(best_run, {}).get(alg)
        lines.append(row + (f"{r['nfe_per_batch']:>8.1f}{r['wall_s']:>9.2f}" if r else ""))
    for n, info in runs.items():
        ce = info.get("val_ce_unweighted")
        lines.append(f"  {n}: train {info.get('loop_s', 0):.0f}s ({1000 * info.get('step_time_s', 0):.0f} ms/step), "
                     f"final train CE {info.get('final_ce', float('nan')):.4f}, val CE (unweighted) "
                     f"{ce if ce is None else round(ce, 4)}")
    s = result.get("summary")
    if s:
        lines.append(f"{s['fast_setting']} vs {s['best_one_per_step']} ({best_run}): {s['fast_speedup_nfe']:.1f}x fewer "
                     f"forward passes, {s['fast_speedup_wall']:.1f}x wall; {100 * s['fast_accuracy']:.1f}% vs "
                     f"{100 * s['best_one_per_step_accuracy']:.1f}%")
        lines.append(f"goal: best >= 95% {'MET' if s['goal_accuracy'] else 'NOT MET'}; fast within 1 point "
                     f"{'MET' if s['goal_fast'] else 'NOT MET'}; total {result['timings_s']['total']:.0f}s "
                     f"(budget {args['budget_s']:.0f}s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model, task and budget (~2 minutes)")
    p.add_argument("--task", choices=tasks.SYNTHETIC_TASKS)
    p.add_argument("--task-opts", type=json.loads, help='JSON options of make_rows, e.g. \'{"op":"mul","digits":3,"digits2":3}\' '
                                                         'or \'{"blanks":[6,10]}\'')
    for name, tp, help_ in [
        ("train-rows", int, "distinct training problems"), ("val-rows", int, "val problems (val loss)"),
        ("eval-rows", int, "held-out problems graded before/after training"),
        ("hidden", int, "model width"), ("layers", int, "decoder layers"), ("heads", int, "attention heads"),
        ("kv-heads", int, "key/value heads (GQA)"), ("intermediate", int, "MLP width"),
        ("batch", int, "global batch (rows)"), ("micro-batch", int, "rows per forward pass"),
        ("lr", float, "peak learning rate"), ("warmup", float, "warm-up fraction"),
        ("min-lr-ratio", float, "cosine floor"), ("weight-decay", float, "AdamW weight decay"),
        ("budget-s", float, "wall-clock budget for the whole script, seconds"),
        ("max-steps", int, "upper bound on steps per run when --steps is auto"),
        ("min-steps", int, "lower bound on steps per run when --steps is auto"),
        ("calib-steps", int, "trainer steps per calibration run"), ("eval-batch", int, "rows per generate() call"),
        ("reweightings", str, "comma-separated diffusion.time_reweighting values, one training run each"),
    ]:
        p.add_argument(f"--{name}", type=tp, help=help_)
    p.add_argument("--steps", default="auto", help="optimizer steps per run, or 'auto' (fit --budget-s)")
    p.add_argument("--parallel", choices=["auto", "on", "off"], help="train the runs at once on one GPU")
    p.add_argument("--samplers", default=",".join(ALL_SAMPLERS))
    p.add_argument("--base-eval-rows", type=int, default=200, help="held-out rows for the random model's evaluation (0: all)")
    p.add_argument("--fast-thresholds", default="0.9,0.99,0.999",
                   help="the fast sampler is evaluated at each threshold (prefix KV cache), and at the first without the cache")
    p.add_argument("--fast-block", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="training compute dtype on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores but one)")
    p.add_argument("--out", default=None, help="results directory (default $OUT, else bench/results)")
    p.add_argument("--name", default=None, help="output file stem (default learn, or learn_tiny with --tiny)")
    p.add_argument("--work", default=None, help="keep data, models and runs here (default: a temporary dir)")
    a = p.parse_args(argv)
    defaults = TINY_DEFAULTS if a.tiny else GPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.task_opts is None:
        a.task_opts = dict(defaults["task_opts"]) if a.task == defaults["task"] else {}
    a.name = a.name or ("learn_tiny" if a.tiny else "learn")
    a.samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
    bad = [s for s in a.samplers if s not in ALL_SAMPLERS]
    if bad:
        p.error(f"unknown sampler {bad[0]}; choose from {', '.join(ALL_SAMPLERS)}")
    if "fast" in a.samplers:  # one entry per fast setting: fast@T for each threshold, and the first without cache
        ts = [float(t) for t in a.fast_thresholds.split(",") if t.strip()]
        i = a.samplers.index("fast")
        a.samplers[i:i + 1] = [f"fast@{t:g}" for t in ts] + [f"fast@{ts[0]:g}-nocache"]
    a.reweightings = [r.strip() for r in a.reweightings.split(",") if r.strip()]
    if a.batch % a.micro_batch:
        p.error("--batch must be a multiple of --micro-batch")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops the workers
    try:
        return run(a)
    finally:
        for w in L.ACTIVE:
            w.kill()


def run(a) -> int:
    import torch

    from dreamtune.data import encode_examples
    from dreamtune.engine import encode_prompt, resolve_device
    from dreamtune.export import save_hf
    from dreamtune.tiny import tiny_lm
    from dreamtune.tokenizer import load_tokenizer

    deadline = T_START + a.budget_s
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # On a CPU, one core is left free by default: torch's threads wait on each other, and on a machine that
    # other work shares, two threads on two busy cores ran the samplers 10-15x slower than one thread did.
    cpu_threads = a.threads or max(1, ncpu - 1)
    torch.set_num_threads(cpu_threads if not torch.cuda.is_available() or a.device == "cpu" else ncpu)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = resolve_device(a.device)
    dev_name = device.type
    device_desc = torch.cuda.get_device_name(0) if dev_name == "cuda" else f"CPU x{ncpu} ({platform.processor() or platform.machine()})"
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None if a.work else tempfile.mkdtemp(prefix="dreamtune-learn-")
    work = Path(a.work).absolute() if a.work else Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    timings = {"imports": time.time() - T_START}
    say(f"device {device_desc}; budget {a.budget_s:.0f}s; work dir {work}; results -> {out_dir}")

    # 1. data: held-out, val and train rows, all distinct
    t0 = time.time()
    rows = L.make_unique_rows(a.task, a.train_rows + a.val_rows + a.eval_rows, a.seed, a.task_opts, workers=min(16, ncpu))
    eval_rows, val_rows, train_rows = rows[:a.eval_rows], rows[a.eval_rows:a.eval_rows + a.val_rows], rows[a.eval_rows + a.val_rows:]
    train_file, val_file, calib_file = (work / "data" / f"{x}.parquet" for x in ("train", "val", "calib"))
    L.write_parquet(train_rows, train_file)
    if val_rows:
        L.write_parquet(val_rows, val_file)
    L.write_parquet(train_rows[:a.batch * (a.calib_steps + 1)], calib_file)
    timings["data"] = time.time() - t0

    # 2. model, and the lengths measured with the tokenizer as the trainer loads it from the saved directory
    t0 = time.time()
    lm = tiny_lm(alphabet=tasks.alphabet(a.task) + L.ROLE_CHARS, hidden_size=a.hidden, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, intermediate_size=a.intermediate, max_positions=512, seed=a.seed)
    base_dir = save_hf(lm, work / "base", dtype=torch.float32)
    tok = load_tokenizer(base_dir)
    n_params = sum(p.numel() for p in lm.model.parameters())
    del lm
    # One token per character, so the longest rows by characters are the longest in tokens; the trainer
    # raises if any row is longer than data.max_length, so this is checked, not assumed.
    longest = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[-64:]
    t_enc, sample = time.time(), rows[:2000]
    enc = encode_examples(tok, [r["prompt"] for r in sample], [r["response"] for r in sample])
    encode_per_row = (time.time() - t_enc) / len(sample)
    enc_long = encode_examples(tok, [r["prompt"] for r in longest], [r["response"] for r in longest])
    if any(tok.unk_token_id in p or tok.unk_token_id in r for p, r in enc):
        raise RuntimeError("a character of the task is missing from the tokenizer's alphabet")
    max_length = max(len(p) + len(r) for p, r in enc_long + enc) + 2  # every row ends in eos, then >= 2 pads of canvas
    eval_prompt_len = max(len(encode_prompt(tok, L.eval_prompt(r, a.task))) for r in eval_rows)
    prompt_len = max(max(len(p) for p, _ in enc + enc_long), eval_prompt_len)
    new_tokens = max_length - prompt_len
    timings["model"] = time.time() - t0
    task_name = f"{a.task} {json.dumps(a.task_opts, sort_keys=True)}"
    say(f"task {task_name}: {len(train_rows)} train / {len(val_rows)} val / {len(eval_rows)} held-out rows; "
        f"max_length {max_length} (prompt {prompt_len}, {new_tokens} new tokens); model {n_params / 1e6:.1f}M params")

    result = {
        "benchmark": "bench/learn.py", "status": "running",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(), "device": device_desc,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers")},
        "args": dict(vars(a)),
        "task": {"name": task_name, "task": a.task, "opts": a.task_opts,
                 "example": {k: train_rows[0][k] for k in ("prompt", "response", "answer")}},
        "model": {"arch": "qwen2 (Dream), bidirectional, shift", "params": n_params, "hidden": a.hidden, "layers": a.layers,
                  "heads": a.heads, "kv_heads": a.kv_heads, "intermediate": a.intermediate, "vocab": len(tok)},
        "data": {"train_rows": len(train_rows), "val_rows": len(val_rows), "eval_rows": len(eval_rows),
                 "max_length": max_length, "prompt_tokens": prompt_len, "new_tokens": new_tokens},
        "timings_s": timings,
    }

    def save(status: str) -> None:
        result["status"] = status
        timings["total"] = time.time() - T_START
        (out_dir / f"{a.name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")

    save("running")
    eval_kw = dict(new_tokens=new_tokens, device=device, batch_size=a.eval_batch, seed=a.seed, fast_block=a.fast_block)

    # 3. the untrained model; a random model scores 0 on every sampler: a subset of the held-out rows shows it
    t0 = time.time()
    base = L.load_model(base_dir, device)
    base_rows = eval_rows[:a.base_eval_rows] if a.base_eval_rows else eval_rows
    result["base_eval"] = L.evaluate(base, base_rows, a.task, a.samplers, **eval_kw)
    result["data"]["base_eval_rows"] = len(base_rows)
    del base
    L.free_memory(device)
    timings["base_eval"] = base_eval_s = time.time() - t0
    say("base (random weights): " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in result["base_eval"].items()))
    save("running")

    # 4. calibration and the number of steps
    def overrides_for(name, steps, train, val, rw):
        return L.train_overrides(a, base_dir=base_dir, train_file=train, val_file=val, max_length=max_length,
                               steps=steps, run_dir=work / "runs" / name, reweighting=rw, device=dev_name)

    def threads(together: int) -> int:  # CPU threads per training process
        return max(1, cpu_threads // together) if dev_name == "cpu" else max(1, min(8, ncpu // 2))

    def start(name, steps, train, val, rw, together):
        return L.Worker(name, overrides_for(name, steps, train, val, rw), work, threads(together))

    n_runs = len(a.reweightings)
    parallel = n_runs > 1 and (a.parallel == "on" or (a.parallel == "auto" and dev_name == "cuda"))
    calib, steps = {}, None if a.steps == "auto" else int(a.steps)
    if steps is None:
        t0 = time.time()
        # the evaluations still to come, timed as the base one (scaled to all held-out rows)
        steps, parallel, calib = L.fit_steps(a, start, calib_file, parallel=parallel, deadline=deadline, say=say,
                                             eval_s=base_eval_s * len(eval_rows) / len(base_rows),
                                             encode_per_row=encode_per_row)
        timings["calibration"] = time.time() - t0
    result.update(calibration=calib, steps=steps, mode="at once" if parallel else "one after another")
    save("running")

    # 5. training. On a GPU a run still going well past the budget is stopped (the command would outlive its
    # slot); on a CPU shared with other work the clock is noisy, so the runs always finish and the budget is advisory.
    t0 = time.time()
    vf = val_file if val_rows else None
    hard = deadline + min(60.0, 0.1 * a.budget_s) if dev_name == "cuda" else None
    if parallel:
        ws = {rw: start(f"run-{rw}", steps, train_file, vf, rw, n_runs) for rw in a.reweightings}
        runs = {rw: x.wait(hard) for rw, x in ws.items()}
    else:
        runs = {}
        for rw in a.reweightings:
            say(f"training: time_reweighting={rw}, {steps} steps")
            runs[rw] = start(f"run-{rw}", steps, train_file, vf, rw, 1).wait(hard)
    timings["train"] = time.time() - t0
    for rw, info in runs.items():
        st, vl = [m for m in info["metrics"] if "loss" in m], [m for m in info["metrics"] if "val_loss" in m]
        info["final_loss"] = sum(m["loss"] for m in st[-50:]) / max(1, len(st[-50:]))
        info["final_ce"] = sum(m["ce"] for m in st[-50:]) / max(1, len(st[-50:]))
        info["final_val_loss"] = vl[-1]["val_loss"] if vl else None
        info["steps"] = len(st)
        info["tokens_per_s"] = sorted(m["tokens_per_s"] for m in st)[len(st) // 2] if st else None
        say(f"trained {rw}: {len(st)} steps in {info['loop_s']:.0f}s ({1000 * info['step_time_s']:.1f} ms/step), "
            f"final CE {info['final_ce']:.4f}, val loss {info['final_val_loss']}")
    result["runs"] = {rw: {k: v for k, v in info.items() if k != "metrics"} for rw, info in runs.items()}
    save("running")

    # 6. evaluation of the trained models, and the unweighted CE of every model on the val rows
    t0 = time.time()
    samples_out = []
    for rw in a.reweightings:
        lm_t = L.load_model(work / "runs" / f"run-{rw}" / "checkpoint-final", device)
        ev = L.evaluate(lm_t, eval_rows, a.task, a.samplers, **eval_kw)
        ce = L.masked_ce(lm_t, overrides_for(f"run-{rw}", steps, train_file, vf, rw), device, a.seed)
        del lm_t
        L.free_memory(device)
        result["runs"][rw].update(eval=L.strip_samples(ev), val_ce_unweighted=ce)
        runs[rw]["val_ce_unweighted"] = ce
        samples_out += [{"run": rw, "sampler": alg, **s} for alg, r in ev.items() for s in r["samples"]]
        say(f"{rw}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['nfe_per_batch']:.0f} nfe, {v['wall_s']:.1f}s)"
                                  for k, v in ev.items()))
        save("running")
    base_ce_lm = L.load_model(base_dir, device)
    result["base_val_ce_unweighted"] = L.masked_ce(base_ce_lm, overrides_for("base", steps, train_file, vf, "none"), device, a.seed)
    del base_ce_lm
    timings["eval"] = time.time() - t0
    samples_out += [{"run": "base", "sampler": alg, **s} for alg, r in result["base_eval"].items() for s in r["samples"]]
    result["base_eval"] = L.strip_samples(result["base_eval"])
    summary = summarize(result, a.samplers, a.reweightings)
    if summary is not None:
        result["summary"] = summary

    # 7. outputs
    acc = {"base": result["base_eval"], **{rw: result["runs"][rw].get("eval", {}) for rw in a.reweightings}}
    png = out_dir / f"{a.name}_loss.png"
    note = plot(runs, acc, png, f"dreamtune learns: {task_name}, {n_params / 1e6:.1f}M params, {steps} steps x {a.batch} "
                                f"({result['mode']}), {device_desc}")
    result["png"] = str(png) if note is None else note
    with open(out_dir / f"{a.name}_samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples_out)
    save("done")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(result), flush=True)
    return 0


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())

