#!/usr/bin/env python3
"""Proof that it learns: a small Dream-architecture model, trained from random weights by dreamtune's own
trainer, solves a synthetic reasoning task with worked solutions; graded with dreamtune's samplers and
grader, before and after training, for every sampler and for two time reweightings.

    PYTHONPATH=. python3 bench/learn.py           # the H200 run: 4x4 sudoku, 10 blanks (budget 500 s, a 9-minute slot)
    PYTHONPATH=. python3 bench/learn.py --tiny    # the same pipeline on a CPU in ~2 minutes (2-digit addition)
    PYTHONPATH=. python3 bench/learn.py --task arithmetic --task-opts '{"op":"mul","digits":3,"digits2":3}' --name learn_mul

What runs, in order (every piece is dreamtune's own, nothing is re-implemented here):
  1. data: `dreamtune.tasks.synthetic.make_rows` rows with worked steps, de-duplicated by prompt and split
     into train / val (parquet, prompt + response columns) and held-out eval problems never trained on;
  2. model: `dreamtune.tiny.tiny_lm` (Qwen2 = Dream's architecture, bidirectional, shifted logits) over
     `dreamtune.tiny.char_tokenizer`, saved with `dreamtune.export.save_hf` as the random "base";
  3. base evaluation: every sampler of `dreamtune.engine.generate` at temperature 0 (origin,
     maskgit_plus, topk_margin, entropy with steps = max_new_tokens, i.e. ~one token per step; and
     alg="fast", the block-wise threshold sampler with the KV cache), graded by `grade_synthetic`;
  4. calibration: a few dozen real trainer steps (alone, and on a GPU also two runs at once) to measure
     the step time; the number of steps is then chosen so that everything fits in --budget-s;
  5. training: `dreamtune.train.train(load_config(None, overrides))`, once per time reweighting
     (`diffusion.time_reweighting` original = 1/t and cart), same data, seed and steps; on a GPU the two
     runs share it at once when the calibration says that gives more steps each;
  6. evaluation of both trained models as in 3, plus each model's unweighted masked cross-entropy on the
     val rows (so original and cart, whose training losses weigh tokens differently, compare fairly);
  7. learn.json, learn_loss.png (training CE, val loss, accuracy) and learn_samples.jsonl (learn_tiny.* with
     --tiny) into $OUT if set, else bench/results/; a compact table printed last.

Goal (issue 8): >= 95% exact match on a non-trivial task, the fast sampler within 1 point of the best
one-token-per-step sampler. Training runs live in a temporary work directory (--work to keep them).
"""

from __future__ import annotations

import time

T_START = time.time()  # the budget counts from here, before the heavy imports

import argparse
import json
import math
import os
import platform
import shutil
import signal
import string
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL_SAMPLERS = ("origin", "maskgit_plus", "topk_margin", "entropy", "fast")
ONE_PER_STEP = ("origin", "maskgit_plus", "topk_margin", "entropy")
ROLE_CHARS = string.ascii_lowercase  # the chat template's role names ("user", "assistant")

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


def elapsed() -> float:
    return time.time() - T_START


def say(msg: str) -> None:
    print(f"[learn {elapsed():6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data


def make_unique_rows(task: str, n: int, seed: int, opts: dict, workers: int) -> list[dict]:
    """n rows with distinct prompts, deterministic for (task, n, seed, opts). Drawn in chunks of seeds
    (in parallel processes: 4x4 sudoku generation searches grids and is slow), then de-duplicated in order.
    A sudoku `blanks` given as [lo, hi] cycles through the blank counts chunk by chunk."""
    from dreamtune.tasks.synthetic import make_rows

    chunk = 5_000
    blanks = opts.get("blanks") if task == "sudoku" else None
    seen, out, k = set(), [], 0
    while len(out) < n:
        need = int((n - len(out)) * 1.15) + 16
        jobs = []
        for _ in range(max(1, math.ceil(need / chunk))):
            o = dict(opts)
            if isinstance(blanks, (list, tuple)):
                lo, hi = blanks
                o["blanks"] = lo + k % (hi - lo + 1)
            jobs.append((task, chunk, seed * 100_003 + k, o))
            k += 1
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            # spawn, not fork: this process has threads (torch, maybe CUDA) and a forked child could deadlock
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
                parts = [f.result() for f in [ex.submit(make_rows, t, m, sd, **o) for t, m, sd, o in jobs]]
        else:
            parts = [make_rows(t, m, sd, **o) for t, m, sd, o in jobs]
        for part in parts:
            for r in part:
                if r["prompt"] not in seen:
                    seen.add(r["prompt"])
                    out.append(r)
        if k > 400 + 10 * math.ceil(n / chunk):
            raise ValueError(f"task {task} {opts} has fewer than {n} distinct problems; lower the row counts")
    out = out[:n]
    if isinstance(blanks, (list, tuple)):  # interleave the blank counts, so that every split holds each
        import random

        random.Random(seed).shuffle(out)
    return out


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
                      "answer": [str(r["answer"]) for r in rows]})
    pq.write_table(table, path)


# Prompts are encoded and answers decoded exactly as the quickstart does it.
from dreamtune.engine import decode_answer, encode_prompt, left_pad  # noqa: E402



# ----------------------------------------------------------------------------------------------- eval


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(lm, rows, task, samplers, *, new_tokens: int, device, batch_size: int, seed: int,
             fast_block: int, keep_samples: int = 5, keep_failures: int = 5) -> dict:
    """Accuracy, forward passes and wall time of each sampler on `rows` (greedy, temperature 0).
    Fast-sampler settings are named `fast@THRESHOLD` (prefix KV cache) or `fast@THRESHOLD-nocache`."""
    import torch

    from dreamtune.engine import generate
    from dreamtune.tasks.synthetic import final_answer, grade_synthetic

    lm.model.eval()
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids, mask = left_pad([encode_prompt(lm.tokenizer, r["prompt"], chat=True) for r in chunk], lm.tokenizer.pad_token_id)
        batches.append((chunk, ids.to(device), mask.to(device)))
    out = {}
    for alg in samplers:
        kw = dict(max_new_tokens=new_tokens, alg=alg, temperature=0.0)
        if alg.startswith("fast"):
            threshold, use_cache = fast_setting(alg)
            kw.update(alg="fast", threshold=threshold, block_length=fast_block, use_cache=use_cache)
        else:
            kw.update(steps=new_tokens)
        # warm-up (kernels, allocator) on two rows, so that wall times compare samplers, not first calls
        generate(lm, batches[0][1][:2], batches[0][2][:2], generator=torch.Generator(device=device).manual_seed(0), **kw)
        sync(device)
        g = torch.Generator(device=device).manual_seed(seed)
        t0 = time.perf_counter()
        correct, nfe, samples = 0, [], []
        for chunk, ids, mask in batches:
            res = generate(lm, ids, mask, generator=g, **kw)
            nfe.append(res.nfe)
            seqs = res.sequences[:, ids.shape[1]:].tolist()
            for r, toks in zip(chunk, seqs):
                resp, _ = decode_answer(lm, toks, skip_special_tokens=True)
                ok = grade_synthetic(task, resp, r["answer"])
                correct += ok
                if len(samples) < keep_samples or (not ok and keep_failures > 0):
                    keep_failures -= not ok
                    samples.append({"prompt": r["prompt"], "answer": r["answer"], "response": resp,
                                    "extracted": final_answer(resp), "correct": bool(ok)})
        sync(device)
        wall = time.perf_counter() - t0
        out[alg] = {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
                    "nfe_per_batch": sum(nfe) / len(nfe), "batches": len(nfe), "wall_s": round(wall, 3),
                    "samples": samples}
        if alg.startswith("fast"):
            out[alg].update(threshold=kw["threshold"], block_length=fast_block, use_cache=kw["use_cache"])
    return out


def fast_setting(name: str) -> tuple[float, bool]:
    """`fast@0.9` -> (0.9, True); `fast@0.9-nocache` -> (0.9, False)."""
    spec = name.split("@", 1)[1]
    return float(spec.removesuffix("-nocache")), not spec.endswith("-nocache")


def masked_ce(lm, overrides: list[str], device, seed: int, batches: int = 4) -> float | None:
    """Unweighted masked cross-entropy on the val rows (time_reweighting none, fixed noise): the same yardstick
    for models trained with different reweightings."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.examples import load_examples
    from dreamtune.diffusion import forward_loss
    from dreamtune.train import make_batch
    from dreamtune.training import step_generator

    cfg = load_config(None, overrides + ["diffusion.time_reweighting=none"])
    if not cfg.data.val_files:
        return None
    val, _ = load_examples(cfg.data.val_files, lm.tokenizer, cfg)
    micro = cfg.data.micro_batch_size_per_gpu
    total, n = 0.0, 0
    with torch.no_grad():
        for k in range(min(batches, math.ceil(len(val) / micro))):
            chunk = val[k * micro:(k + 1) * micro]
            batch = make_batch(chunk, cfg, lm.tokenizer.pad_token_id, step_generator(seed, 99, k)).to(device)
            loss, _, _ = forward_loss(lm, batch, cfg.diffusion, step_generator(seed, 98, k, device=device.type))
            total += float(loss)
            n += 1
    return total / max(n, 1)


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training runs are other processes: leave them the memory


def load_model(path: Path, device):
    from dreamtune.models import load

    return load(path, dtype="fp32", device=device)


# ----------------------------------------------------------------------------------------------- training


def worker_main(spec_path: str) -> int:
    """One training run in its own process (so that two can share a GPU): the real trainer, nothing else."""
    t0 = time.time()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from dreamtune.config import load_config
    from dreamtune.train import train

    t1 = time.time()
    train(load_config(None, spec["overrides"]))
    t2 = time.time()
    Path(spec["done"]).write_text(json.dumps({"import_s": t1 - t0, "train_call_s": t2 - t1}))
    return 0


ACTIVE: list["Worker"] = []  # workers started by this process, stopped if it is stopped


class Worker:
    def __init__(self, name: str, overrides: list[str], work: Path, threads: int):
        self.name, self.run_dir = name, Path(next(o.split("=", 1)[1] for o in overrides
                                                   if o.startswith("trainer.default_local_dir=")))
        if self.run_dir.exists():  # metrics.jsonl appends: a run directory is always fresh
            shutil.rmtree(self.run_dir)
        self.spec = work / f"{name}.spec.json"
        self.done = work / f"{name}.done.json"
        self.log = work / f"{name}.log"
        self.done.unlink(missing_ok=True)
        self.spec.write_text(json.dumps({"overrides": overrides, "threads": threads, "done": str(self.done)}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(self.spec)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        ACTIVE.append(self)

    def wait(self, deadline: float | None = None) -> dict:
        while self.proc.poll() is None:
            if deadline is not None and time.time() > deadline:
                self.kill()
                raise TimeoutError(f"training run {self.name} passed the hard deadline; see {self.log}")
            time.sleep(0.5)
        wall = time.time() - self.t0
        if self.proc.returncode != 0 or not self.done.exists():
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"training run {self.name} failed (exit {self.proc.returncode}); log {self.log}:\n{tail}")
        info = json.loads(self.done.read_text())
        info["wall_s"] = wall
        info["metrics"] = read_metrics(self.run_dir / "metrics.jsonl")
        steps = [m for m in info["metrics"] if "loss" in m]
        info["step_time_s"] = step_time(steps)
        info["loop_s"] = steps[-1]["time_s"] if steps else 0.0
        # everything but the loop: interpreter start, imports, model load, data encoding, final save/export
        info["overhead_s"] = wall - info["loop_s"]
        return info

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
                self.proc.wait(10)
            except Exception:
                self.proc.kill()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_time(step_rows: list[dict], skip: int = 3) -> float:
    """Seconds per optimizer step past the first `skip` steps (warm-up, allocator, autotuning): the larger of
    the median (robust to a stall) and the mean (which counts validation and stalls)."""
    ts = [r["time_s"] for r in step_rows][skip:]
    if len(ts) < 2:
        return float("nan")
    diffs = sorted(b - a for a, b in zip(ts, ts[1:]))
    return max(diffs[len(diffs) // 2], (ts[-1] - ts[0]) / (len(ts) - 1))


def train_overrides(a, *, base_dir: Path, train_file: Path, val_file: Path | None, max_length: int, steps: int,
                    run_dir: Path, reweighting: str, device: str) -> list[str]:
    o = [
        f"model.partial_pretrain={base_dir}",
        f"data.train_files=['{train_file}']",
        f"data.max_length={max_length}",
        f"data.train_batch_size={a.batch}",
        f"data.micro_batch_size_per_gpu={a.micro_batch}",
        "data.val_batches=2",
        f"model.dtype={a.dtype}",
        f"optim.lr={a.lr}",
        f"optim.warmup_steps_ratio={a.warmup}",
        f"optim.min_lr_ratio={a.min_lr_ratio}",
        f"optim.weight_decay={a.weight_decay}",
        f"diffusion.time_reweighting={reweighting}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={run_dir}",
        f"trainer.seed={a.seed}",
        f"trainer.save_checkpoint_steps={10**9}",  # only the final save (the last step always saves)
        "trainer.keep_last=1",
        f"trainer.val_check_steps={max(1, steps // 20)}",
        "trainer.logger=['console']",
        "trainer.wandb_mode=disabled",
        f"trainer.device={device}",
    ]
    if val_file is not None:
        o.append(f"data.val_files=['{val_file}']")
    return o


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
        xs = [m["step"] for m in rows]
        ema, sm = None, []
        for m in rows:
            ema = m["ce"] if ema is None else 0.97 * ema + 0.03 * m["ce"]
            sm.append(ema)
        c = colors.get(name)
        axes[0].plot(xs, [m["ce"] for m in rows], color=c, alpha=0.15, lw=0.6)
        axes[0].plot(xs, sm, color=c, lw=1.6, label=f"{name} (EMA)")
        val = [m for m in info["metrics"] if "val_loss" in m]
        if val:
            axes[1].plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", color=c, ms=3, label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("masked-token cross-entropy (train)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("val loss (each run's own weighting)")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    algs = list(next(iter(acc.values())).keys()) if acc else []
    width = 0.8 / max(1, len(acc))
    for i, (name, res) in enumerate(acc.items()):
        vals = [100 * res[a]["accuracy"] if a in res else 0 for a in algs]
        axes[2].bar([j + i * width for j in range(len(algs))], vals, width, label=name,
                    color=colors.get(name, "tab:gray"))
    axes[2].set_xticks([j + width * (len(acc) - 1) / 2 for j in range(len(algs))])
    axes[2].set_xticklabels(algs, rotation=20)
    axes[2].axhline(95, color="k", ls="--", lw=0.8)
    axes[2].set_ylabel("exact match on held-out problems (%)")
    axes[2].set_ylim(0, 100)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def strip_samples(ev: dict) -> dict:
    return {alg: {k: v for k, v in r.items() if k != "samples"} for alg, r in ev.items()}


def table(result: dict) -> str:
    runs = result.get("runs", {})
    names = ["base"] + list(runs)
    evals = {"base": result.get("base_eval", {})}
    evals.update({n: runs[n].get("eval", {}) for n in runs})
    algs = [a for a in result["args"]["samplers"]]
    d = result["data"]
    m = result["model"]
    head = (f"learn: {result['task']['name']}, {m['params'] / 1e6:.1f}M params ({m['layers']}x{m['hidden']}), "
            f"{result.get('steps', '?')} steps x batch {result['args']['batch']} per run "
            f"({result.get('mode', '?')}), {d['eval_rows']} held-out problems, {d['new_tokens']} new tokens, "
            f"{result['device']}")
    lines = [head]
    hdr = f"{'sampler':<18}" + "".join(f"{n + ' acc':>14}" for n in names) + f"{'nfe':>8}{'wall s':>9}"
    lines.append(hdr)
    best_run = result.get("summary", {}).get("best_run", names[-1])
    for alg in algs:
        row = f"{alg:<18}"
        for n in names:
            r = evals[n].get(alg)
            row += f"{(100 * r['accuracy']):>13.1f}%" if r else f"{'-':>14}"
        r = evals.get(best_run, {}).get(alg)
        row += f"{r['nfe_per_batch']:>8.1f}{r['wall_s']:>9.2f}" if r else ""
        lines.append(row)
    for n in runs:
        info = runs[n]
        lines.append(f"  {n}: train {info.get('loop_s', 0):.0f}s ({1000 * info.get('step_time_s', 0):.0f} ms/step), "
                     f"final train CE {info.get('final_ce', float('nan')):.4f}, val CE (unweighted) "
                     f"{info.get('val_ce_unweighted') if info.get('val_ce_unweighted') is None else round(info['val_ce_unweighted'], 4)}")
    s = result.get("summary")
    if s:
        lines.append(f"{s['fast_setting']} vs {s['best_one_per_step']} ({best_run}): {s['fast_speedup_nfe']:.1f}x fewer forward passes, "
                     f"{s['fast_speedup_wall']:.1f}x wall; {100 * s['fast_accuracy']:.1f}% vs "
                     f"{100 * s['best_one_per_step_accuracy']:.1f}%")
        lines.append(f"goal: best >= 95% {'MET' if s['goal_accuracy'] else 'NOT MET'}; fast within 1 point "
                     f"{'MET' if s['goal_fast'] else 'NOT MET'}; total {result['timings_s']['total']:.0f}s "
                     f"(budget {result['args']['budget_s']:.0f}s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model, task and budget (~2 minutes)")
    p.add_argument("--task", choices=["arithmetic", "sudoku"])
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
    p.add_argument("--base-eval-rows", type=int, default=200,
                   help="held-out rows for the random model's evaluation (0: all)")
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
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
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
        fast = [f"fast@{t:g}" for t in ts] + [f"fast@{ts[0]:g}-nocache"]
        i = a.samplers.index("fast")
        a.samplers[i:i + 1] = fast
    a.reweightings = [r.strip() for r in a.reweightings.split(",") if r.strip()]
    if a.batch % a.micro_batch:
        p.error("--batch must be a multiple of --micro-batch")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops the workers
    try:
        return run(a)
    finally:
        for w in ACTIVE:
            w.kill()


def run(a) -> int:
    deadline = T_START + a.budget_s

    import torch

    from dreamtune.data import encode_examples
    from dreamtune.export import save_hf
    from dreamtune.tasks.synthetic import alphabet
    from dreamtune.tiny import tiny_lm

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # On a CPU, one core is left free by default: torch's threads wait on each other, and on a machine that
    # other work shares, two threads on two busy cores ran the samplers 10-15x slower than one thread did.
    cpu_threads = a.threads or max(1, ncpu - 1)
    torch.set_num_threads(cpu_threads if not torch.cuda.is_available() or a.device == "cpu" else ncpu)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev_name = "cuda" if (a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())) else "cpu"
    device = torch.device(dev_name)
    device_desc = torch.cuda.get_device_name(0) if dev_name == "cuda" else f"CPU x{ncpu} ({platform.processor() or platform.machine()})"
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    if a.work:
        work = Path(a.work).absolute()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="dreamtune-learn-")
        work = Path(tmp)
    timings = {"imports": elapsed()}
    say(f"device {device_desc}; budget {a.budget_s:.0f}s; work dir {work}; results -> {out_dir}")

    # 1. data --------------------------------------------------------------------------------------------
    t0 = time.time()
    n_total = a.train_rows + a.val_rows + a.eval_rows
    rows = make_unique_rows(a.task, n_total, a.seed, a.task_opts, workers=min(16, ncpu))
    eval_rows, val_rows, train_rows = rows[:a.eval_rows], rows[a.eval_rows:a.eval_rows + a.val_rows], rows[a.eval_rows + a.val_rows:]
    train_file, val_file = work / "data" / "train.parquet", work / "data" / "val.parquet"
    write_parquet(train_rows, train_file)
    if val_rows:
        write_parquet(val_rows, val_file)
    calib_file = work / "data" / "calib.parquet"
    write_parquet(train_rows[:a.batch * (a.calib_steps + 1)], calib_file)
    timings["data"] = time.time() - t0

    # 2. model -------------------------------------------------------------------------------------------
    t0 = time.time()
    lm = tiny_lm(alphabet=alphabet(a.task) + ROLE_CHARS, hidden_size=a.hidden, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, intermediate_size=a.intermediate, max_positions=512, seed=a.seed)
    base_dir = save_hf(lm, work / "base", dtype=torch.float32)
    # Lengths are measured with the tokenizer as the trainer will load it from the saved directory
    from dreamtune.models import load_tokenizer

    tok = load_tokenizer(base_dir)
    n_params = sum(p.numel() for p in lm.model.parameters())
    # Lengths: one token per character, so the longest rows by characters are the longest in tokens; the
    # trainer raises if any row is longer than data.max_length, so this is checked, not assumed.
    longest = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[-64:]
    t_enc = time.time()
    sample = rows[:2000]
    enc = encode_examples(tok, [r["prompt"] for r in sample], [r["response"] for r in sample])
    encode_per_row = (time.time() - t_enc) / len(sample)
    enc_long = encode_examples(tok, [r["prompt"] for r in longest], [r["response"] for r in longest])
    max_len_rows = max(len(p) + len(r) for p, r in enc_long + enc)
    unk = tok.unk_token_id
    if any(unk in p or unk in r for p, r in enc):
        raise RuntimeError("a character of the task is missing from the tokenizer's alphabet")
    max_length = max_len_rows + 2  # every row ends in eos, then at least two eos pads of canvas to fill
    eval_prompt_len = max(len(encode_prompt(tok, r["prompt"], chat=True)) for r in eval_rows)
    prompt_len = max(max(len(p) for p, _ in enc + enc_long), eval_prompt_len)
    new_tokens = max_length - prompt_len
    del lm
    timings["model"] = time.time() - t0
    task_name = f"{a.task} {json.dumps(a.task_opts, sort_keys=True)}"
    say(f"task {task_name}: {len(train_rows)} train / {len(val_rows)} val / {len(eval_rows)} held-out rows; "
        f"max_length {max_length} (prompt {prompt_len}, {new_tokens} new tokens); model {n_params / 1e6:.1f}M params")

    result = {
        "benchmark": "bench/learn.py", "issue": 8, "status": "running",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(), "device": device_desc,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers")},
        "args": {k: v for k, v in vars(a).items() if k != "worker"},
        "task": {"name": task_name, "task": a.task, "opts": a.task_opts, "example": {k: train_rows[0][k] for k in ("prompt", "response", "answer")}},
        "model": {"arch": "qwen2 (Dream), bidirectional, shift", "params": n_params, "hidden": a.hidden, "layers": a.layers,
                  "heads": a.heads, "kv_heads": a.kv_heads, "intermediate": a.intermediate, "vocab": len(tok)},
        "data": {"train_rows": len(train_rows), "val_rows": len(val_rows), "eval_rows": len(eval_rows),
                 "max_length": max_length, "prompt_tokens": prompt_len, "new_tokens": new_tokens},
        "timings_s": timings,
    }
    json_path = out_dir / f"{a.name}.json"

    def save(status: str) -> None:
        result["status"] = status
        timings["total"] = elapsed()
        json_path.write_text(json.dumps(result, indent=1, default=float) + "\n")

    save("running")
    eval_kw = dict(new_tokens=new_tokens, device=device, batch_size=a.eval_batch, seed=a.seed,
                   fast_block=a.fast_block)

    # 3. the untrained model -----------------------------------------------------------------------------
    t0 = time.time()
    base = load_model(base_dir, device)
    # a random model scores 0 on every sampler: a subset of the held-out rows shows it and saves the budget
    base_rows = eval_rows[:a.base_eval_rows] if a.base_eval_rows else eval_rows
    result["base_eval"] = evaluate(base, base_rows, a.task, a.samplers, **eval_kw)
    result["data"]["base_eval_rows"] = len(base_rows)
    del base
    free_memory(device)
    base_eval_s = time.time() - t0
    timings["base_eval"] = base_eval_s
    say("base (random weights): " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in result["base_eval"].items()))
    save("running")

    # 4. calibration and the number of steps --------------------------------------------------------------
    def overrides_for(name, steps, train, val, rw):
        return train_overrides(a, base_dir=base_dir, train_file=train, val_file=val, max_length=max_length,
                               steps=steps, run_dir=work / "runs" / name, reweighting=rw, device=dev_name)

    def threads(together: int) -> int:  # CPU threads per training process
        return max(1, cpu_threads // together) if dev_name == "cpu" else max(1, min(8, ncpu // 2))

    calib = {}
    parallel = len(a.reweightings) > 1 and (a.parallel == "on" or (a.parallel == "auto" and dev_name == "cuda"))
    if a.steps == "auto":
        t0 = time.time()
        w = Worker("calib-solo", overrides_for("calib-solo", a.calib_steps, calib_file, None, a.reweightings[0]), work, threads(1))
        solo = w.wait()
        calib["solo"] = {k: solo[k] for k in ("step_time_s", "overhead_s", "wall_s", "import_s")}
        say(f"calibration: {1000 * solo['step_time_s']:.1f} ms/step alone (start-up and save {solo['overhead_s']:.1f}s)")
        if parallel:
            ws = [Worker(f"calib-pair{i}", overrides_for(f"calib-pair{i}", a.calib_steps, calib_file, None, rw), work,
                         threads(len(a.reweightings)))
                  for i, rw in enumerate(a.reweightings)]
            pair = [x.wait() for x in ws]
            pair_step = max(x["step_time_s"] for x in pair)
            calib["together"] = {"step_time_s": pair_step, "runs": len(ws)}
            # together: each run does a step every pair_step; one after another: every len x solo
            parallel = a.parallel == "on" or pair_step < 0.9 * len(ws) * solo["step_time_s"]
            say(f"calibration: {1000 * pair_step:.1f} ms/step with {len(ws)} runs at once -> "
                f"{'at once' if parallel else 'one after another'}")
        timings["calibration"] = time.time() - t0
        n_runs = len(a.reweightings)
        # what the real runs cost besides their steps: start-up as measured, plus encoding the larger data
        extra_rows = a.train_rows + a.val_rows - a.batch * (a.calib_steps + 1)
        overhead = solo["overhead_s"] + encode_per_row * max(0, extra_rows)
        # evals like the base one (scaled to all held-out rows; 0.8: a trained model's fast sampler needs far
        # fewer forward passes than a random one's), CE, plots
        eval_reserve = n_runs * base_eval_s * len(eval_rows) / len(base_rows) * 0.8 + 5 + 2 * n_runs
        window = deadline - time.time() - eval_reserve - 5
        if parallel:
            per_step = calib["together"]["step_time_s"] if "together" in calib else solo["step_time_s"] * n_runs
            avail = window - overhead
        else:
            per_step = solo["step_time_s"] * n_runs
            avail = window - n_runs * overhead
        # validation every steps/20 (2 micro batches, forward only) and the clock's noise: 12% margin
        steps = int(0.88 * avail / per_step)
        steps_unclamped = steps
        steps = max(a.min_steps, min(a.max_steps, steps))
        calib.update({"eval_reserve_s": eval_reserve, "overhead_per_run_s": overhead, "window_s": window,
                      "per_step_s": per_step, "steps_fit": steps_unclamped})
        say(f"plan: {steps} steps per run, {n_runs} runs {'at once' if parallel else 'one after another'}: "
            f"~{steps * per_step:.0f}s of steps in all + ~{overhead:.0f}s start-up per run; {eval_reserve:.0f}s kept for evaluation")
    else:
        steps = int(a.steps)
    result.update(calibration=calib, steps=steps, mode="at once" if parallel else "one after another")
    save("running")

    # 5. training ------------------------------------------------------------------------------------------
    t0 = time.time()
    vf = val_file if val_rows else None
    # On a GPU a run still going well past the budget is stopped (the command would outlive its slot); on a
    # CPU shared with other work the clock is noisy, so the runs always finish and the budget is advisory.
    hard = deadline + min(60.0, 0.1 * a.budget_s) if dev_name == "cuda" else None
    runs = {}
    ws_names = a.reweightings
    if parallel:
        ws = {rw: Worker(f"run-{rw}", overrides_for(f"run-{rw}", steps, train_file, vf, rw), work, threads(len(ws_names)))
              for rw in a.reweightings}
        for rw, x in ws.items():
            runs[rw] = x.wait(hard)
    else:
        for rw in a.reweightings:
            say(f"training: time_reweighting={rw}, {steps} steps")
            runs[rw] = Worker(f"run-{rw}", overrides_for(f"run-{rw}", steps, train_file, vf, rw), work, threads(1)).wait(hard)
    timings["train"] = time.time() - t0
    for rw, info in runs.items():
        st = [m for m in info["metrics"] if "loss" in m]
        vl = [m for m in info["metrics"] if "val_loss" in m]
        info["final_loss"] = sum(m["loss"] for m in st[-50:]) / max(1, len(st[-50:]))
        info["final_ce"] = sum(m["ce"] for m in st[-50:]) / max(1, len(st[-50:]))
        info["final_val_loss"] = vl[-1]["val_loss"] if vl else None
        info["steps"] = len(st)
        info["tokens_per_s"] = sorted(m["tokens_per_s"] for m in st)[len(st) // 2] if st else None
        say(f"trained {rw}: {len(st)} steps in {info['loop_s']:.0f}s ({1000 * info['step_time_s']:.1f} ms/step), "
            f"final CE {info['final_ce']:.4f}, val loss {info['final_val_loss']}")
    result["runs"] = {rw: {k: v for k, v in info.items() if k != "metrics"} for rw, info in runs.items()}
    save("running")

    # 6. evaluation of the trained models ------------------------------------------------------------------
    t0 = time.time()
    samples_out = []
    for rw in a.reweightings:
        lm_t = load_model(work / "runs" / f"run-{rw}" / "checkpoint-final", device)
        ev = evaluate(lm_t, eval_rows, a.task, a.samplers, **eval_kw)
        ce = masked_ce(lm_t, overrides_for(f"run-{rw}", steps, train_file, vf, rw), device, a.seed)
        del lm_t
        free_memory(device)
        result["runs"][rw]["eval"] = strip_samples(ev)
        result["runs"][rw]["val_ce_unweighted"] = ce
        runs[rw]["val_ce_unweighted"] = ce
        for alg, r in ev.items():
            samples_out += [{"run": rw, "sampler": alg, **s} for s in r["samples"]]
        say(f"{rw}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['nfe_per_batch']:.0f} nfe, {v['wall_s']:.1f}s)"
                                  for k, v in ev.items()))
        save("running")
    base_ce_lm = load_model(base_dir, device)
    result["base_val_ce_unweighted"] = masked_ce(base_ce_lm, overrides_for("base", steps, train_file, vf, "none"), device, a.seed)
    del base_ce_lm
    timings["eval"] = time.time() - t0
    for alg, r in result["base_eval"].items():
        samples_out += [{"run": "base", "sampler": alg, **s} for s in r["samples"]]
    result["base_eval"] = strip_samples(result["base_eval"])

    # summary: the best one-token-per-step sampler of the best run, and the fast sampler of that run
    best = None
    for rw in a.reweightings:
        ev = result["runs"][rw].get("eval", {})
        for alg in ONE_PER_STEP:
            if alg in ev and (best is None or ev[alg]["accuracy"] > best[2]):
                best = (rw, alg, ev[alg]["accuracy"])
    fast_names = [x for x in a.samplers if x.startswith("fast")]
    if best is not None and any(x in result["runs"][best[0]].get("eval", {}) for x in fast_names):
        rw, alg, acc = best
        ev = result["runs"][rw]["eval"]
        tried = [x for x in fast_names if x in ev]
        # the fast setting reported: the one with fewest forward passes among those within 1 point of the
        # best one-token-per-step sampler, else the most accurate
        within = [x for x in tried if ev[x]["accuracy"] >= acc - 0.01]
        pick = (min(within, key=lambda x: ev[x]["nfe_per_batch"]) if within
                else max(tried, key=lambda x: ev[x]["accuracy"]))
        fast = ev[pick]
        result["summary"] = {
            "best_run": rw, "best_one_per_step": alg, "best_one_per_step_accuracy": acc,
            "fast_setting": pick, "fast_accuracy": fast["accuracy"],
            "fast_speedup_nfe": ev[alg]["nfe_per_batch"] / max(fast["nfe_per_batch"], 1e-9),
            "fast_speedup_wall": ev[alg]["wall_s"] / max(fast["wall_s"], 1e-9),
            "fast_settings": {x: {"accuracy": ev[x]["accuracy"], "nfe_per_batch": ev[x]["nfe_per_batch"],
                                  "wall_s": ev[x]["wall_s"]} for x in tried},
            "goal_accuracy": acc >= 0.95, "goal_fast": fast["accuracy"] >= acc - 0.01,
            "by_reweighting": {r: max((result["runs"][r]["eval"][x]["accuracy"] for x in ONE_PER_STEP
                                       if x in result["runs"][r].get("eval", {})), default=None) for r in a.reweightings},
        }

    # 7. outputs ---------------------------------------------------------------------------------------------
    acc = {"base": result["base_eval"], **{rw: result["runs"][rw].get("eval", {}) for rw in a.reweightings}}
    png = out_dir / f"{a.name}_loss.png"
    title = (f"dreamtune learns: {task_name}, {n_params / 1e6:.1f}M params, {steps} steps x {a.batch} "
             f"({result['mode']}), {device_desc}")
    note = plot(runs, acc, png, title)
    result["png"] = str(png) if note is None else note
    with open(out_dir / f"{a.name}_samples.jsonl", "w") as f:
        for s in samples_out:
            f.write(json.dumps(s) + "\n")
    save("done")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(result), flush=True)
    return 0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
