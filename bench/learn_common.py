#!/usr/bin/env python3
"""What the two learning benchmarks (bench/learn.py, bench/grpo_learn.py) share: distinct rows of a synthetic
task and their parquet files, the trainer's overrides for a tiny model from scratch, training runs in child
processes timed against a budget, and held-out evaluation as `dreamtune eval` answers and grades.

    import learn_common as L                      # with bench/ on sys.path, as both benchmarks put it
    rows = L.make_unique_rows("arithmetic", 1000, seed=0, opts={"op": "add", "digits": 2}, workers=1)
    ev = L.evaluate(L.load_model(model_dir, device), rows, "arithmetic", ["maskgit_plus", "fast@0.9"],
                    new_tokens=32, device=device, batch_size=100, seed=0, fast_block=32)
    python bench/learn_common.py SPEC.json        # one training run (what `Worker` starts)

Every piece is dreamtune's own: rows from the task registry (`dreamtune.tasks.make_rows`), prompts from
`tasks.build_prompt`, answers from `engine.generate_batches`, verdicts from `grading.grade_many`, step times
from the run's metrics.jsonl (`report_inputs.metrics_rows`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dreamtune import tasks  # noqa: E402
from dreamtune.quickstart import ROLE_CHARS  # noqa: E402,F401  the chat template's role names, for tiny_lm's alphabet
from dreamtune.report_inputs import metrics_rows  # noqa: E402


def make_unique_rows(task: str, n: int, seed: int, opts: dict, workers: int) -> list[dict]:
    """n rows with distinct prompts, deterministic for (task, n, seed, opts). Drawn in chunks of seeds
    (in parallel processes: 4x4 sudoku generation searches grids and is slow), then de-duplicated in order.
    A sudoku `blanks` given as [lo, hi] cycles through the blank counts chunk by chunk."""
    import multiprocessing
    import random
    from concurrent.futures import ProcessPoolExecutor

    chunk, blanks = 5_000, opts.get("blanks") if task == "sudoku" else None
    seen, out, k = set(), [], 0
    while len(out) < n:
        jobs = []
        for _ in range(max(1, math.ceil((int((n - len(out)) * 1.15) + 16) / chunk))):
            o = dict(opts)
            if isinstance(blanks, (list, tuple)):
                o["blanks"] = blanks[0] + k % (blanks[1] - blanks[0] + 1)
            jobs.append((chunk, seed * 100_003 + k, o))
            k += 1
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: this process has threads (torch, maybe CUDA) and a forked child could deadlock
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
                parts = [f.result() for f in [ex.submit(tasks.make_rows, task, m, sd, **o) for m, sd, o in jobs]]
        else:
            parts = [tasks.make_rows(task, m, sd, **o) for m, sd, o in jobs]
        for r in (r for part in parts for r in part if r["prompt"] not in seen):
            seen.add(r["prompt"])
            out.append(r)
        if k > 400 + 10 * math.ceil(n / chunk):
            raise ValueError(f"task {task} {opts} has fewer than {n} distinct problems; lower the row counts")
    out = out[:n]
    if isinstance(blanks, (list, tuple)):  # interleave the blank counts, so that every split holds each
        random.Random(seed).shuffle(out)
    return out


def write_parquet(rows: list[dict], path: Path) -> None:
    """prompt, response and answer columns: SFT reads the first two, GRPO the first and the last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: [str(r[k]) if k == "answer" else r[k] for r in rows]
                             for k in ("prompt", "response", "answer")}), path)


# ----------------------------------------------------------------------------------------------- eval


def fast_setting(name: str) -> tuple[float, bool]:
    """`fast@0.9` -> (0.9, True); `fast@0.9-nocache` -> (0.9, False)."""
    spec = name.split("@", 1)[1]
    return float(spec.removesuffix("-nocache")), not spec.endswith("-nocache")


def eval_prompt(row: dict, task: str) -> list[dict]:
    """The chat prompt `dreamtune eval` gives a synthetic task's problem: the bare question, no system turn."""
    return tasks.build_prompt({"question": row["prompt"]}, "chat", task=task, system_prompt=None)


def evaluate(lm, rows, task, samplers, *, new_tokens: int, device, batch_size: int, seed: int,
             fast_block: int, keep_samples: int = 5, keep_failures: int = 5) -> dict:
    """Accuracy, forward passes and wall time of each sampler on `rows` (greedy, temperature 0), answered and
    graded as `dreamtune eval` does it: batches by prompt length, each seeded from `seed` and its rows. Fast-
    sampler settings are named `fast@THRESHOLD` (prefix KV cache) or `fast@THRESHOLD-nocache`. The model runs
    on its own device (`device` is where the callers loaded it)."""
    from dreamtune.engine import encode_prompt, generate_batches, sampler_for
    from dreamtune.grading import grade_many

    lm.model.eval()
    prompts = [encode_prompt(lm.tokenizer, eval_prompt(r, task)) for r in rows]
    out, failures = {}, keep_failures  # failures kept beyond the first samples: keep_failures over all samplers
    for alg in samplers:
        if alg.startswith("fast"):
            threshold, use_cache = fast_setting(alg)
            sampler = sampler_for("fast", temperature=0.0, threshold=threshold, block_length=fast_block, use_cache=use_cache)
        else:
            sampler = sampler_for(alg, temperature=0.0, steps=new_tokens)
        kw = dict(max_new_tokens=new_tokens, seed=seed, skip_special_tokens=True)
        # warm-up (kernels, allocator) on two rows, so that wall times compare samplers, not first calls
        generate_batches(lm, prompts[:2], sampler, batch_size=2, **kw)
        nfe = []
        t0 = time.perf_counter()
        answers = generate_batches(lm, prompts, sampler, batch_size=batch_size,
                                   on_batch=lambda idx, done: nfe.append(done[0]["nfe"]), **kw)
        verdicts = grade_many([{"response": x["response"], "answer": r["answer"]} for x, r in zip(answers, rows)], task)
        wall = time.perf_counter() - t0
        samples = []
        for r, x, v in zip(rows, answers, verdicts):
            if len(samples) < keep_samples or (not v["correct"] and failures > 0):
                failures -= not v["correct"]
                samples.append({"prompt": r["prompt"], "answer": r["answer"], "response": x["response"],
                                "extracted": v["extracted"], "correct": v["correct"]})
        correct = sum(v["correct"] for v in verdicts)
        out[alg] = {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
                    "nfe_per_batch": sum(nfe) / len(nfe), "batches": len(nfe), "wall_s": round(wall, 3), "samples": samples}
        if alg.startswith("fast"):
            out[alg].update(threshold=sampler.threshold, block_length=fast_block, use_cache=sampler.use_cache)
    return out


def strip_samples(ev: dict) -> dict:
    return {alg: {k: v for k, v in r.items() if k != "samples"} for alg, r in ev.items()}


def masked_ce(lm, overrides: list[str], device, seed: int, batches: int = 4) -> float | None:
    """Unweighted masked cross-entropy on the val rows (time_reweighting none, fixed noise): the same yardstick
    for models trained with different reweightings."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.diffusion import forward_loss
    from dreamtune.examples import load_examples
    from dreamtune.train import make_batch
    from dreamtune.training import step_generator

    cfg = load_config(None, overrides + ["diffusion.time_reweighting=none"])
    if not cfg.data.val_files:
        return None
    val, _ = load_examples(cfg.data.val_files, lm.tokenizer, cfg)
    micro, losses = cfg.data.micro_batch_size_per_gpu, []
    with torch.no_grad():
        for k in range(min(batches, math.ceil(len(val) / micro))):
            batch = make_batch(val[k * micro:(k + 1) * micro], cfg, lm.tokenizer.pad_token_id, step_generator(seed, 99, k)).to(device)
            losses.append(float(forward_loss(lm, batch, cfg.diffusion, step_generator(seed, 98, k, device=device.type))[0]))
    return sum(losses) / max(len(losses), 1)


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training runs are other processes: leave them the memory


def load_model(path: Path, device):
    """A saved model in fp32, ready to generate, as the eval verb loads it."""
    from dreamtune.engine import load_for_generation

    return load_for_generation(str(path), device.type, "fp32")


# ----------------------------------------------------------------------------------------------- training


def train_overrides(a, *, base_dir: Path, train_file: Path, val_file: Path | None, max_length: int, steps: int,
                    run_dir: Path, reweighting: str, device: str) -> list[str]:
    """The trainer's overrides for one run of the benchmark's model (its settings from the command line `a`):
    only the final save, validation every steps/20 when there are val rows."""
    return [
        f"model.partial_pretrain={base_dir}", f"data.train_files=['{train_file}']", f"data.max_length={max_length}",
        f"data.train_batch_size={a.batch}", f"data.micro_batch_size_per_gpu={a.micro_batch}", "data.val_batches=2",
        f"model.dtype={a.dtype}", f"optim.lr={a.lr}", f"optim.warmup_steps_ratio={a.warmup}",
        f"optim.min_lr_ratio={a.min_lr_ratio}", f"optim.weight_decay={a.weight_decay}",
        f"diffusion.time_reweighting={reweighting}", f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={run_dir}", f"trainer.seed={a.seed}",
        f"trainer.save_checkpoint_steps={10**9}",  # only the final save (the last step always saves)
        "trainer.keep_last=1", f"trainer.val_check_steps={max(1, steps // 20)}", "trainer.logger=['console']",
        "trainer.wandb_mode=disabled", f"trainer.device={device}",
    ] + ([f"data.val_files=['{val_file}']"] if val_file is not None else [])


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
    Path(spec["done"]).write_text(json.dumps({"import_s": t1 - t0, "train_call_s": time.time() - t1}))
    return 0


ACTIVE: list["Worker"] = []  # workers started by this process, stopped if it is stopped


def step_time(step_rows: list[dict], skip: int = 3) -> float:
    """Seconds per optimizer step past the first `skip` steps (warm-up, allocator, autotuning): the larger of
    the median (robust to a stall) and the mean (which counts validation and stalls)."""
    ts = [r["time_s"] for r in step_rows][skip:]
    if len(ts) < 2:
        return float("nan")
    diffs = sorted(b - a for a, b in zip(ts, ts[1:]))
    return max(diffs[len(diffs) // 2], (ts[-1] - ts[0]) / (len(ts) - 1))


class Worker:
    """`python bench/learn_common.py SPEC`: a training run in a process group of its own (stopped with it)."""

    def __init__(self, name: str, overrides: list[str], work: Path, threads: int):
        self.name = name
        self.run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.default_local_dir=")))
        if self.run_dir.exists():  # metrics.jsonl appends: a run directory is always fresh
            shutil.rmtree(self.run_dir)
        self.spec, self.done, self.log = (work / f"{name}.{x}" for x in ("spec.json", "done.json", "log"))
        self.done.unlink(missing_ok=True)
        self.spec.write_text(json.dumps({"overrides": overrides, "threads": threads, "done": str(self.done)}))
        env = dict(os.environ, PYTHONUNBUFFERED=os.environ.get("PYTHONUNBUFFERED", "1"))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(self.spec)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
        info = {**json.loads(self.done.read_text()), "wall_s": wall, "metrics": metrics_rows(self.run_dir)}
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


def fit_steps(a, start, calib_file: Path, *, parallel: bool, deadline: float, eval_s: float, encode_per_row: float,
              say) -> tuple[int, bool, dict]:
    """--steps auto: (steps per run, whether the runs train at once, the calibration's figures). a.calib_steps
    real trainer steps alone, and with `parallel` every run at once, give the step time; the steps are then
    what fits before `deadline` besides each run's start-up and the evaluations still to come (`eval_s` per
    run). start(name, steps, train_file, val_file, reweighting, runs_at_once) starts a Worker."""
    calib, n_runs = {}, len(a.reweightings)
    solo = start("calib-solo", a.calib_steps, calib_file, None, a.reweightings[0], 1).wait()
    calib["solo"] = {k: solo[k] for k in ("step_time_s", "overhead_s", "wall_s", "import_s")}
    say(f"calibration: {1000 * solo['step_time_s']:.1f} ms/step alone (start-up and save {solo['overhead_s']:.1f}s)")
    if parallel:
        ws = [start(f"calib-pair{i}", a.calib_steps, calib_file, None, rw, n_runs) for i, rw in enumerate(a.reweightings)]
        pair_step = max(x.wait()["step_time_s"] for x in ws)
        calib["together"] = {"step_time_s": pair_step, "runs": len(ws)}
        # together: each run does a step every pair_step; one after another: every len x solo
        parallel = a.parallel == "on" or pair_step < 0.9 * len(ws) * solo["step_time_s"]
        say(f"calibration: {1000 * pair_step:.1f} ms/step with {len(ws)} runs at once -> "
            f"{'at once' if parallel else 'one after another'}")
    # what the real runs cost besides their steps: start-up as measured, plus encoding the larger data
    overhead = solo["overhead_s"] + encode_per_row * max(0, a.train_rows + a.val_rows - a.batch * (a.calib_steps + 1))
    # evaluations (0.8: a trained model's fast sampler needs far fewer forward passes than a random one's), CE, plots
    eval_reserve = n_runs * eval_s * 0.8 + 5 + 2 * n_runs
    window = deadline - time.time() - eval_reserve - 5
    if parallel:
        per_step, avail = calib["together"]["step_time_s"], window - overhead
    else:
        per_step, avail = solo["step_time_s"] * n_runs, window - n_runs * overhead
    # validation every steps/20 (2 micro batches, forward only) and the clock's noise: 12% margin
    steps_fit = int(0.88 * avail / per_step)
    steps = max(a.min_steps, min(a.max_steps, steps_fit))
    calib.update({"eval_reserve_s": eval_reserve, "overhead_per_run_s": overhead, "window_s": window,
                  "per_step_s": per_step, "steps_fit": steps_fit})
    say(f"plan: {steps} steps per run, {n_runs} runs {'at once' if parallel else 'one after another'}: "
        f"~{steps * per_step:.0f}s of steps in all + ~{overhead:.0f}s start-up per run; {eval_reserve:.0f}s kept for evaluation")
    return steps, parallel, calib


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
