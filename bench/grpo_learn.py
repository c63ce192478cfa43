#!/usr/bin/env python3
"""Proof that GRPO learns: a small model left half-trained by SFT on a synthetic reasoning task gains held-out
accuracy from diffu-GRPO with the task's exact-match reward, against the same number of extra SFT steps.

    PYTHONPATH=. python3 bench/grpo_learn.py --out $OUT      # the proof: one H200, about 2 minutes (2 CPU cores: about 6)
    PYTHONPATH=. python3 bench/grpo_learn.py --tiny          # the same pipeline at tiny sizes: a CPU smoke run, ~15 s
    PYTHONPATH=. python3 bench/grpo_learn.py --cpu-study --threads 1 --arms "lr=1e-4;lr=1e-4,beta=0.04"   # GRPO settings
    PYTHONPATH=. python3 bench/grpo_learn.py --sudoku10 --out $OUT   # a larger model on 10-blank sudoku, one H200, ~8 min
    PYTHONPATH=. python3 bench/grpo_learn.py --shape dream7b --out $OUT   # rollout tokens/s and one GRPO step, Dream-7B shape, LoRA, one GPU

What runs (bench/learn_common.py's pieces, shared with bench/learn.py, for data, model, SFT overrides and evaluation; dreamtune's trainers):
  1. rows of the task (`make_unique_rows`): SFT/GRPO training problems and held-out problems never trained on;
  2. a random Dream-architecture model (`tiny_lm`), SFT by `dreamtune.train.train` on a long cosine schedule,
     stopped early (`trainer.max_steps_this_run`), in rounds of --sft-chunk steps until the held-out accuracy
     (fast sampler, greedy) reaches --sft-target (the goal is a start between 40% and 80%);
  3. GRPO (`dreamtune.grpo.train`, trainer.stage=grpo) from that checkpoint, --grpo-steps steps, reward 1 for
     an exact final answer (`grade_synthetic`), once per learning rate of --grpo-lr (a comma-separated list:
     one run each from the same start), or once per run of --arms ("lr=1e-4;lr=5e-4,beta=0.04": settings
     lr, beta, iterations, temperature, generations, prompts, p_mask_prompt, epsilon, prompt_mask_per_group,
     schedule; the others from the command line). The run reported as GRPO's is chosen by its own training
     reward (the mean of its last tenth of steps), never by held-out accuracy; every run's held-out figures,
     reward, clip-fraction and grad-norm curves (by tenths) are recorded in the JSON's grpo_runs;
  4. the control: the stopped SFT run resumed for the same number of steps;
  5. held-out accuracy of all three (every --samplers setting, greedy), the reward curve, a table, and
     grpo_learn.json (grpo_learn_tiny.json with --tiny, grpo_learn_cpu_study.json with --cpu-study,
     grpo_learn_sudoku10.json with --sudoku10) in --out ($OUT, else bench/results). --save-start DIR keeps the
     SFT start and its prompts (bench/grpo_grad_noise.py).
Goal: GRPO at least +10 points over its start, and ahead of the control.

The default (the proof): 2-digit addition, a Dream-architecture model of hidden 64 and 2 layers, SFT on a long
schedule (10,000 steps, lr 3e-3) stopped from step 1500 in rounds of 300 at 45% held-out; 500 held-out
problems; two GRPO runs of 200 steps of 16 prompts x 8 rollouts: d1's settings at lr 1e-4 (p_mask_prompt 0.15,
no KL term) and lr 5e-4 with the KL term (beta 0.04) and no prompt mask. --cpu-study: the same start with one
GRPO run of 100 steps per setting (~1 minute a run on one CPU thread; CPU SFT is deterministic, so every run
starts from the same model). `--task sudoku --task-opts '{"blanks": 4}'` instead: 56-token answers over 2
fast-sampler blocks. The runs behind these settings (CPU and GPU) are in BENCHMARKS.md, diffu-GRPO.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import learn_common as L  # noqa: E402  bench/learn_common.py: data, model, SFT overrides and evaluation

SUDOKU10 = dict(task="sudoku", task_opts={"blanks": 10}, train_rows=100_000, eval_rows=500, hidden=512, layers=8, heads=8,
                kv_heads=4, intermediate=2048, batch=256, micro_batch=256, lr=1e-3, sft_total=3000, sft_chunk=75,
                sft_first=300, sft_rounds=6, sft_target=0.45, grpo_steps=150, prompts=64, generations=8, iterations=2,
                grpo_lr="5e-5", temperature=1.0, beta=0.0)
TINY = dict(task="arithmetic", task_opts={"op": "add", "digits": 2}, train_rows=3_000, eval_rows=40, hidden=64, layers=2,
            heads=4, kv_heads=2, intermediate=128, batch=16, micro_batch=16, lr=3e-3, sft_total=2000, sft_chunk=40,
            sft_first=60, sft_rounds=2, sft_target=0.4, grpo_steps=4, prompts=4, generations=4, iterations=2,
            grpo_lr="2e-5", temperature=1.0, beta=0.0)
# --cpu-study: a start between 40% and 80% on a CPU in about two minutes, and GRPO runs of a minute or two each
CPU_STUDY = dict(TINY, train_rows=6_000, eval_rows=500, sft_total=10_000, sft_first=1500, sft_chunk=300, sft_rounds=12,
                 sft_target=0.45, grpo_steps=100, prompts=16, generations=8)
# the default, the proof: the study's start, two GRPO runs of 200 steps (the settings the study's runs favoured)
PROOF = dict(CPU_STUDY, grpo_steps=200, grpo_lr="1e-4", arms="lr=1e-4;lr=5e-4,beta=0.04,p_mask_prompt=0")


def _flag(v: str) -> bool:
    if v.lower() not in ("1", "0", "true", "false"):
        raise SystemExit(f"--arms: expected true/false/1/0, got '{v}'")
    return v.lower() in ("1", "true")


ARM_KEYS = {"lr": float, "beta": float, "iterations": int, "temperature": float, "generations": int, "prompts": int,
            "p_mask_prompt": float, "epsilon": float, "prompt_mask_per_group": _flag, "schedule": str}  # what one GRPO run of --arms may set
SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab): Dream-v0-7B's, and a CPU check of the same code
    "dream7b": (3584, 28, 28, 4, 18944, 152064),
    "tiny": (64, 2, 4, 2, 128, 512),
}


def tenths(curve: list[dict], key: str) -> list[float]:
    """The mean of `key` over each tenth of a run's steps (a last, shorter chunk when the steps do not divide)."""
    k = max(1, len(curve) // 10)
    return [sum(m.get(key, 0.0) for m in curve[i:i + k]) / len(curve[i:i + k]) for i in range(0, len(curve), k)]


def parse_arms(spec: str | None, a) -> list[dict]:
    """The GRPO runs from one SFT start: --arms "lr=5e-5;lr=5e-5,beta=0.04,iterations=8" (each run: the command
    line's settings, these replaced), else one run per learning rate of --grpo-lr."""
    base = {"beta": a.beta, "iterations": a.iterations, "temperature": a.temperature, "generations": a.generations,
            "prompts": a.prompts, "p_mask_prompt": a.p_mask_prompt, "epsilon": a.epsilon,
            "prompt_mask_per_group": a.prompt_mask_per_group, "schedule": a.grpo_schedule}
    if not spec:
        return [{**base, "lr": lr, "label": f"lr {lr:g}"} for lr in a.grpo_lr]
    arms = []
    for part in (x.strip() for x in spec.split(";")):
        if not part:
            continue
        arm, given = {**base, "lr": a.grpo_lr[0]}, []
        for item in part.split(","):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in ARM_KEYS:
                raise SystemExit(f"--arms: unknown setting '{key}' in '{part}'; settings: {', '.join(ARM_KEYS)}")
            arm[key] = ARM_KEYS[key](value.strip())
            if key == "schedule" and arm[key] not in ("constant", "cosine"):
                raise SystemExit(f"--arms: schedule is constant or cosine, got '{arm[key]}'")
            given.append(key)
        arms.append({**arm, "label": " ".join(f"{k}={arm[k]:g}" if not isinstance(arm[k], str) else f"{k}={arm[k]}"
                                              for k in given)})
    return arms


def hf_from_checkpoint(base_dir: Path, ckpt: Path, out: Path) -> Path:
    """A resumable (DCP) full-model checkpoint as an HF directory the samplers and GRPO load."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dreamtune.export import save_hf
    from dreamtune.models import load

    flat = out.with_suffix(".pt")
    dcp_to_torch_save(ckpt, flat)
    lm = load(base_dir, dtype="fp32")
    lm.model.load_state_dict(torch.load(flat, weights_only=False)["model"])
    flat.unlink()
    return save_hf(lm, out, dtype=torch.float32)


def accuracy(model_dir: Path, rows, a, new_tokens: int, device, samplers) -> dict:
    lm = L.load_model(model_dir, device)
    ev = L.evaluate(lm, rows, a.task, samplers, new_tokens=new_tokens, device=device, batch_size=a.eval_rows,
                    seed=a.seed, fast_block=32)
    del lm
    L.free_memory(device)
    return L.strip_samples(ev)


def run(a) -> int:
    import torch

    from dreamtune.checkpoint import latest_checkpoint
    from dreamtune.config import load_config
    from dreamtune.data import encode_examples
    from dreamtune.grpo import train as grpo_train
    from dreamtune.report_inputs import metrics_rows
    from dreamtune.export import save_hf
    from dreamtune.tokenizer import load_tokenizer
    from dreamtune.tasks.synthetic import alphabet
    from dreamtune.tiny import tiny_lm
    from dreamtune.train import train as sft_train

    t_start = time.time()
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 2) - 1))
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dreamtune-grpo-learn-"))
    say = lambda m: print(f"[grpo_learn {time.time() - t_start:6.1f}s] {m}", flush=True)  # noqa: E731

    # 1-2. data and the random base model, as bench/learn.py makes them (bench/learn_common.py)
    rows = L.make_unique_rows(a.task, a.train_rows + a.eval_rows, a.seed, a.task_opts, workers=min(16, os.cpu_count() or 1))
    eval_rows, train_rows = rows[:a.eval_rows], rows[a.eval_rows:]
    train_file = work / "train.parquet"
    L.write_parquet(train_rows, train_file)  # prompt, response, answer: SFT reads the first two, GRPO the first and last
    lm = tiny_lm(alphabet=alphabet(a.task) + L.ROLE_CHARS, hidden_size=a.hidden, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, intermediate_size=a.intermediate, max_positions=512, seed=a.seed)
    base_dir = save_hf(lm, work / "base", dtype=torch.float32)
    tok = load_tokenizer(base_dir)
    enc = encode_examples(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])
    max_length = max(len(p) + len(r) for p, r in enc) + 2
    new_tokens = max_length - max(len(p) for p, _ in enc)
    a.dtype, a.warmup, a.min_lr_ratio, a.weight_decay = "bf16", 0.03, 0.05, 0.01
    sft_dir = work / "sft-run"
    sft = L.train_overrides(a, base_dir=base_dir, train_file=train_file, val_file=None, max_length=max_length,
                            steps=a.sft_total, run_dir=sft_dir, reweighting="original", device=device.type)
    quick = ["fast@0.9"]

    # 2. SFT, stopped early: rounds until the held-out accuracy reaches the target
    done, start_acc, start_dir, rounds = 0, None, None, []
    for k in range(a.sft_rounds):
        n = a.sft_first if k == 0 else a.sft_chunk
        sft_train(load_config(None, sft + [f"trainer.max_steps_this_run={n}", f"trainer.resume_training={k > 0}"]))
        done += n
        start_dir = hf_from_checkpoint(base_dir, latest_checkpoint(sft_dir), work / f"sft-{done}")
        start_acc = accuracy(start_dir, eval_rows, a, new_tokens, device, quick)["fast@0.9"]["accuracy"]
        rounds.append({"sft_steps": done, "accuracy": start_acc})
        say(f"SFT stopped at step {done}: held-out {100 * start_acc:.1f}% (fast@0.9)")
        if start_acc >= a.sft_target:
            break
    if a.save_start:  # the start and its prompts, for bench/grpo_grad_noise.py and the like
        keep = Path(a.save_start)
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copytree(start_dir, keep / "sft-start", dirs_exist_ok=True)
        shutil.copyfile(train_file, keep / "train.parquet")
        say(f"SFT start kept in {keep}/sft-start ({new_tokens} new tokens), its prompts in {keep}/train.parquet")

    # 3. GRPO from the stopped SFT model, once per run of --arms (or learning rate of --grpo-lr)
    def grpo_args(arm: dict, grpo_dir: Path) -> list[str]:
        return [f"model.partial_pretrain={start_dir}", "trainer.stage=grpo", f"grpo.task={a.task}", f"grpo.prompts_file={train_file}",
            "grpo.prompt_format=sft", f"grpo.num_generations={arm['generations']}", f"grpo.num_iterations={arm['iterations']}",
            f"grpo.max_new_tokens={new_tokens}", "grpo.block_length=32", f"grpo.temperature={arm['temperature']}",
            f"grpo.beta={arm['beta']}", "grpo.threshold=0.9", f"data.train_batch_size={arm['prompts']}",
            f"data.micro_batch_size_per_gpu={arm['prompts']}", f"optim.lr={arm['lr']}", f"optim.lr_scheduler={arm['schedule']}",
            "optim.warmup_steps_ratio=0", f"trainer.total_training_steps={a.grpo_steps}", f"trainer.default_local_dir={grpo_dir}",
            f"trainer.save_checkpoint_steps={10**9}", "trainer.logger=['console']", f"trainer.device={device.type}",
            f"trainer.seed={a.seed}", "model.dtype=bf16"] + [f"grpo.{k}={arm[k]}" for k in ("p_mask_prompt", "epsilon",
                                                           "prompt_mask_per_group") if arm[k] is not None]

    arms = []
    for k, arm in enumerate(a.arms):
        grpo_dir = work / f"grpo-run-{k}"
        t0 = time.time()
        grpo_train(load_config(None, grpo_args(arm, grpo_dir)))
        curve = [m for m in metrics_rows(grpo_dir) if "reward_mean" in m]
        tail = curve[-max(1, len(curve) // 10):]
        arms.append({**arm, "dir": grpo_dir, "grpo_s": time.time() - t0, "curve": curve,
                     "final_reward": sum(m["reward_mean"] for m in tail) / len(tail)})
        say(f"GRPO {arm['label']}: {len(curve)} steps in {arms[-1]['grpo_s']:.0f}s, reward {curve[0]['reward_mean']:.3f} -> "
            f"{curve[-1]['reward_mean']:.3f} (last tenth {arms[-1]['final_reward']:.3f})")
    chosen = max(arms, key=lambda arm: arm["final_reward"])  # training reward only: held-out rows stay unseen
    grpo_dir, grpo_s, curve = chosen["dir"], chosen["grpo_s"], chosen["curve"]

    # 4. the control: the same SFT run, resumed from where it stopped for as many steps
    assert done + a.grpo_steps < a.sft_total, "raise --sft-total: the control must stop before the schedule ends"
    sft_train(load_config(None, sft + [f"trainer.max_steps_this_run={a.grpo_steps}", "trainer.resume_training=true"]))
    control_dir = hf_from_checkpoint(base_dir, latest_checkpoint(sft_dir), work / "control")

    # 5. held-out accuracy of the three, every sampler setting
    evals = {name: accuracy(d, eval_rows, a, new_tokens, device, a.samplers)
             for name, d in [("sft_start", start_dir), ("sft_control", control_dir)]}
    for arm in arms:
        arm["eval"] = accuracy(arm["dir"] / "checkpoint-final", eval_rows, a, new_tokens, device, a.samplers)
    evals["grpo"] = chosen["eval"]
    main = a.samplers[0]
    gain = evals["grpo"][main]["accuracy"] - evals["sft_start"][main]["accuracy"]
    control_gain = evals["sft_control"][main]["accuracy"] - evals["sft_start"][main]["accuracy"]
    result = {"benchmark": "bench/grpo_learn.py", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "task": {"task": a.task, "opts": a.task_opts}, "args": {k: v for k, v in vars(a).items()},
              "data": {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "new_tokens": new_tokens},
              "sft_rounds": rounds, "sft_steps": done, "grpo_steps": a.grpo_steps, "grpo_s": grpo_s, "eval": evals,
              "grpo_lr": chosen["lr"], "chosen_by": "the highest mean training reward over the last tenth of steps",
              "grpo_runs": [{**{k: arm[k] for k in ARM_KEYS}, "grpo_s": arm["grpo_s"], "final_train_reward": arm["final_reward"],
                             "reward_tenths": tenths(arm["curve"], "reward_mean"),
                             "clip_fraction_tenths": tenths(arm["curve"], "clip_fraction"),
                             "grad_norm_tenths": tenths(arm["curve"], "grad_norm"), "eval": arm["eval"]} for arm in arms],
              "reward_curve": [{k: m[k] for k in ("step", "reward_mean", "reward_std", "accuracy", "clip_fraction",
                                                   "completion_length", "rollout_s", "update_s")} for m in curve],
              "summary": {"sampler": main, "grpo_gain_points": 100 * gain, "control_gain_points": 100 * control_gain,
                          "start_in_40_80": 0.4 <= evals["sft_start"][main]["accuracy"] <= 0.8,
                          "goal_plus_10": gain >= 0.10, "grpo_beats_control": gain > control_gain},
              "total_s": time.time() - t_start}
    name = a.name or ("grpo_learn_cpu_study" if a.cpu_study else "grpo_learn_tiny" if a.tiny else
                      "grpo_learn_sudoku10" if a.sudoku10 else "grpo_learn")
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"grpo_learn: {a.task} {json.dumps(a.task_opts)}, SFT stopped at {done} steps, {a.grpo_steps} GRPO steps "
          f"({a.prompts} prompts x {a.generations}), {len(eval_rows)} held-out problems, {result['device']}")
    for arm in arms:
        print(f"GRPO {arm['label']}: last-tenth training reward {arm['final_reward']:.3f}, held-out "
              f"{100 * arm['eval'][main]['accuracy']:.1f}% ({main}){'  <- chosen' if arm is chosen else ''}")
    print(f"{'sampler':<16}{'SFT start':>11}{'+GRPO':>9}{'+SFT':>9}")
    for s in a.samplers:
        print(f"{s:<16}" + "".join(f"{100 * evals[n][s]['accuracy']:>{w}.1f}%" for n, w in
                                   [("sft_start", 10), ("grpo", 8), ("sft_control", 8)]))
    print("reward curve (mean of each tenth): " + " ".join(f"{x:.2f}" for x in tenths(curve, "reward_mean")))
    s = result["summary"]
    print(f"GRPO {s['grpo_gain_points']:+.1f} points, SFT control {s['control_gain_points']:+.1f}; goal +10 "
          f"{'MET' if s['goal_plus_10'] else 'NOT MET'}; start in 40-80% {'yes' if s['start_in_40_80'] else 'NO'}; "
          f"total {result['total_s']:.0f}s -> {out_dir / (name + '.json')}")
    return 0


def shape_run(a) -> int:
    """Rollout tokens/s and one GRPO step (rollouts + num_iterations updates) at a model shape, LoRA, random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dreamtune import grpo
    from dreamtune.config import load_config
    from dreamtune.distributed import apply_activation_checkpointing
    from dreamtune.models import new_model, tiny_config
    from dreamtune.engine import generate, sampler_with

    hidden, layers, heads, kv, inter, vocab = SHAPES[a.shape]
    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # 7B initialised on the GPU: seconds, not minutes on the CPU
        lm = new_model(tiny_config(vocab, hidden_size=hidden, layers=layers, heads=heads, kv_heads=kv,
                                   intermediate_size=inter, max_positions=4096), mask_token_id=vocab - 1, dtype=dtype)
    lm.model = get_peft_model(lm.model, LoraConfig(r=128, lora_alpha=64, target_modules="all-linear"))
    apply_activation_checkpointing(lm.model)
    cfg = load_config(None, ["trainer.stage=grpo", "grpo.prompts_file=unused.jsonl", *a.grpo_overrides])
    g = cfg.grpo
    n = a.shape_prompts * g.num_generations
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab - 2, (n, a.prompt_tokens), generator=gen, device=device)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-6)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    kw = dict(max_new_tokens=g.max_new_tokens, sampler=sampler_with(g.alg, steps=g.steps, temperature=g.temperature,
              threshold=g.threshold, block_length=g.block_length, stop_at_eos=False))
    lm.model.eval()
    generate(lm, ids[:g.num_generations], mask[:g.num_generations], generator=gen, **kw)  # warm-up: graphs, allocator
    sync()
    t0 = time.perf_counter()
    out = generate(lm, ids, mask, generator=gen, **kw)
    sync()
    t_roll = time.perf_counter() - t0
    completion = out.sequences[:, a.prompt_tokens:]
    adv = grpo.group_advantages(torch.rand(n, generator=gen, device=device), g.num_generations)
    cmask = torch.ones_like(completion, dtype=torch.float32)
    lm.model.train()
    sync()
    t0 = time.perf_counter()
    for it in range(g.num_iterations):
        for k in range(0, n, g.num_generations):  # one prompt's group per forward, as the recipe's micro-batch 1
            sl = slice(k, k + g.num_generations)
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                logp = grpo.completion_logprobs(lm, ids[sl], mask[sl], completion[sl], g.p_mask_prompt,
                                                torch.Generator(device=device).manual_seed(it))
                loss, _, _ = grpo.grpo_loss(logp, logp.detach(), None, adv[sl], cmask[sl], g.epsilon, 0.0)
            (loss / (n // g.num_generations)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    t_update = time.perf_counter() - t0
    res = {"benchmark": "bench/grpo_learn.py --shape", "shape": a.shape, "lora_rank": 128, "completions": n,
           "prompt_tokens": a.prompt_tokens, "max_new_tokens": g.max_new_tokens, "alg": g.alg, "nfe": out.nfe,
           "rollout_s": t_roll, "rollout_tokens_per_s": n * g.max_new_tokens / t_roll, "update_s": t_update,
           "num_iterations": g.num_iterations, "grpo_step_s": t_roll + t_update,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"grpo_shape_{a.shape}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model, task and steps")
    p.add_argument("--cpu-study", action="store_true", help="the --tiny model and task, trained to a 40-80%% start: "
                   "GRPO settings compared on a CPU (see the docstring)")
    p.add_argument("--sudoku10", action="store_true", help="a hidden-512, 8-layer model on 10-blank sudoku (one GPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="time rollouts and one GRPO step at this shape instead")
    p.add_argument("--task", choices=["arithmetic", "sudoku"])
    p.add_argument("--task-opts", type=json.loads)
    for name, tp in [("train-rows", int), ("eval-rows", int), ("hidden", int), ("layers", int), ("heads", int),
                     ("kv-heads", int), ("intermediate", int), ("batch", int), ("micro-batch", int), ("lr", float),
                     ("sft-total", int), ("sft-chunk", int), ("sft-first", int), ("sft-rounds", int),
                     ("sft-target", float), ("grpo-steps", int), ("prompts", int), ("generations", int),
                     ("iterations", int), ("grpo-lr", str), ("temperature", float), ("beta", float),
                     ("p-mask-prompt", float), ("epsilon", float), ("prompt-mask-per-group", _flag)]:
        p.add_argument(f"--{name}", type=tp)
    p.add_argument("--grpo-schedule", default="constant", choices=["constant", "cosine"],
                   help="GRPO's learning-rate schedule (cosine: to 0 at the last step)")
    p.add_argument("--arms", default=None, help='GRPO runs from the one SFT start, e.g. "lr=5e-5;lr=5e-5,beta=0.04,'
                   'iterations=8" (settings: ' + ", ".join(ARM_KEYS) + '; the rest from the command line); default: '
                   'one per --grpo-lr (without --grpo-lr, the proof\'s two runs: see above)')
    p.add_argument("--samplers", default="fast@0.9,maskgit_plus", help="held-out evaluation settings (greedy)")
    p.add_argument("--shape-prompts", type=int, default=8, help="--shape: prompts per step (x grpo.num_generations)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="--shape: prompt length")
    p.add_argument("--grpo-overrides", nargs="*", default=["grpo.max_new_tokens=256", "grpo.num_iterations=1"],
                   help="--shape: grpo.* key=value settings")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--save-start", default=None, help="copy the SFT start (sft-start/) and train.parquet here")
    a = p.parse_args(argv)
    if a.tiny + a.cpu_study + a.sudoku10 > 1:
        p.error("choose one of --tiny, --cpu-study, --sudoku10")
    if a.grpo_lr is not None and a.arms is None:
        a.arms = ""  # --grpo-lr alone: one run per learning rate, not the default's two runs
    for k, v in (CPU_STUDY if a.cpu_study else TINY if a.tiny else SUDOKU10 if a.sudoku10 else PROOF).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.samplers = [s for s in a.samplers.split(",") if s]
    a.grpo_lr = [float(x) for x in str(a.grpo_lr).split(",") if x]
    a.arms = parse_arms(a.arms, a)
    return a


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    sys.exit(shape_run(args) if args.shape else run(args))
