"""The pieces both training recipes compose (SFT: dreamtune/train.py; GRPO: dreamtune/grpo.py): the step plan
and learning-rate schedule, generators seeded by a step's coordinates, the micro-batches of a step, the
optimizer, the trainer state a checkpoint records, the final export and the out-of-memory advice.

    plan = plan_steps(cfg, n_rows, world)          # steps, accumulation, warm-up; ValueError when they do not fit
    for mb, rows, divisor in micro_batches(examples, step, plan, rank, seed, cfg.data): ...
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dreamtune import distributed as D
from dreamtune.monitor import LOG
from dreamtune.optim import AdamW


def check_run_dir(cfg) -> Path:
    """trainer.default_local_dir, checked before anything is loaded: an error naming it when a file is in its
    way or it cannot be written (a read-only filesystem, no permission)."""
    from dreamtune.atomic import check_writable

    run_dir = Path(cfg.trainer.default_local_dir)
    try:
        check_writable(run_dir / "config.yaml")
    except OSError as e:
        raise type(e)(f"trainer.default_local_dir={run_dir}: {e}") from None
    return run_dir


def plan_steps(cfg, n_rows: int, world: int) -> dict:
    """Optimizer steps, gradient accumulation and warm-up for a run; ValueError when they do not fit."""
    micro, gbs = cfg.data.micro_batch_size_per_gpu, cfg.data.train_batch_size
    if gbs % (micro * world) != 0 and not cfg.data.micro_batch_tokens:
        raise ValueError(
            f"data.train_batch_size={gbs} is not a multiple of data.micro_batch_size_per_gpu={micro} x {world} "
            f"process(es); use e.g. data.train_batch_size={max(1, gbs // (micro * world)) * micro * world}")
    if n_rows < gbs:
        raise ValueError(f"only {n_rows} training rows, fewer than data.train_batch_size={gbs}; lower data.train_batch_size")
    steps_per_epoch = n_rows // gbs  # drop_last: every step sees a full global batch
    total = cfg.trainer.total_training_steps or steps_per_epoch * cfg.trainer.total_epochs
    return {"rows": n_rows, "world_size": world, "global_batch": gbs, "micro_batch": micro,
            "grad_accum": gbs // (micro * world), "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": int(total * cfg.optim.warmup_steps_ratio), "epochs": total / steps_per_epoch}


def lr_lambda(cfg, total: int, warmup: int):
    """Linear warm-up, then cosine to min_lr_ratio (or constant)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.optim.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def step_generator(seed: int, *parts: int, device="cpu") -> torch.Generator:
    """A generator for one (step, rank, micro-batch, ...) coordinate: resume needs no saved RNG state."""
    g = torch.Generator(device=device)
    mixed = seed
    for p in parts:
        mixed = (mixed * 1_000_003 + p + 1) % (2**63 - 1)
    return g.manual_seed(mixed)


def micro_batches(examples, step: int, plan: dict, rank: int, seed: int, data) -> list[tuple[int, list, float]]:
    """This rank's (seed index = place in the global batch, examples, loss divisor) per micro-batch at `step`.
    Fixed micro-batches: rank r takes its slice; each loss (a mean over its masked positions, as Dream's) is
    divided by the accumulation steps. data.micro_batch_tokens: the global batch is grouped by tokens alike
    for any number of ranks and dealt to them in turn; a group of n rows is divided by global_batch / (n x
    ranks), so that after FSDP's mean over ranks every row weighs 1/global_batch, as with one row per
    micro-batch. A rank dealt a group fewer runs a zero-weight copy (divisor inf): the same collectives."""
    from dreamtune.batching import group_by_tokens

    spe, gbs, micro, world = plan["steps_per_epoch"], plan["global_batch"], plan["micro_batch"], plan["world_size"]
    epoch, i = divmod(step, spe)
    order = torch.randperm(len(examples), generator=step_generator(seed, 7, epoch)) if data.shuffle else torch.arange(len(examples))
    batch = order[i * gbs:(i + 1) * gbs].tolist()  # [global batch] row indices
    if not data.micro_batch_tokens:
        per_rank = plan["grad_accum"] * micro
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        return [(rank * plan["grad_accum"] + k // micro, [examples[j] for j in mine[k:k + micro]], plan["grad_accum"])
                for k in range(0, per_rank, micro)]
    rows = [examples[j] for j in batch]
    cutoff = data.perbatch_cutoff_type if data.perbatch_cutoff else None
    groups = group_by_tokens(rows, data.micro_batch_tokens, max_length=data.max_length, cutoff_type=cutoff, packing=data.packing)
    out = [(j, [rows[x] for x in g], gbs / (len(g) * world)) for j, g in enumerate(groups) if j % world == rank]
    while len(out) < math.ceil(len(groups) / world):
        out.append((len(groups), [rows[x] for x in groups[0]], math.inf))
    return out


def trainer_state(cfg, plan) -> dict:
    """What trainer_state.json records beside the step: the seed, the plan and the resolved config."""
    from omegaconf import OmegaConf

    return {"seed": cfg.trainer.seed, "plan": plan, "config": OmegaConf.to_container(cfg, resolve=True)}


def make_optimizer(params, cfg, device_type: str):
    if cfg.optim.state_dtype == "bfloat16":  # moments in bf16, fp32 maths: 8 bytes per parameter less
        return AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                     state_dtype=torch.bfloat16)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                             fused=device_type == "cuda")


def export_final(lm, model, run_dir: Path, cfg, dev: D.Dist) -> None:
    from dreamtune.checkpoint import full_state_dict, merge_lora_state_dict
    from dreamtune.export import save_dream, save_hf

    sd = full_state_dict(model)
    if dev.is_main:
        sd = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in sd.items()}
        if cfg.model.lora_rank > 0:
            sd = merge_lora_state_dict(sd, cfg.model.lora_alpha / cfg.model.lora_rank)
        save_hf(lm, run_dir / "checkpoint-final", dtype=torch.bfloat16, state_dict=sd)
        if cfg.trainer.export_dream:
            save_dream(lm, run_dir / "checkpoint-final-dream", dtype=torch.bfloat16, state_dict=sd)
    D.barrier()


def oom_message(cfg, plan, dev, n_params: int) -> str:
    """The memory plan in one line, and what to change, in the order that costs the least."""
    full_bytes = 16 if cfg.optim.state_dtype == "float32" else 12  # fp32 weights + grads, two moments
    per_gpu = n_params * (full_bytes if cfg.model.lora_rank == 0 else 2) / dev.world / 2**30
    return (f"CUDA out of memory: micro batch {plan['micro_batch']} x {cfg.data.max_length} tokens; "
            f"{n_params / 1e9:.2f}B parameters need ~{per_gpu:.0f} GiB per GPU for weights"
            f"{', gradients and AdamW state (' + str(full_bytes) + ' B/param, sharded over ' + str(dev.world) + ' GPU(s))' if cfg.model.lora_rank == 0 else ' (frozen, LoRA)'}"
            f" plus activations. Try, in order: data.micro_batch_size_per_gpu=1, model.enable_gradient_checkpointing=True, "
            f"{'optim.state_dtype=bfloat16, ' if cfg.model.lora_rank == 0 and cfg.optim.state_dtype == 'float32' else ''}"
            f"data.max_length={cfg.data.max_length // 2}, model.lora_rank=16, model.fsdp_config.cpu_offload=True, or more GPUs")


def apply_lora(model, cfg):
    """The model with peft's LoRA adapters (model.lora_rank, lora_alpha, lora_dropout, target_modules),
    initialised from trainer.seed (peft draws lora_A from the global generator)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.model.target_modules if isinstance(cfg.model.target_modules, str) else list(cfg.model.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed)
        return get_peft_model(model, LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                                                lora_dropout=cfg.model.lora_dropout, target_modules=targets))


def save_when_due(cfg, plan: dict, done: int, ran: int, saver, model, opt) -> bool:
    """After optimizer step `done` (the `ran`-th of this process): a resumable checkpoint at the cadence, at the
    last step and before a stop after trainer.max_steps_this_run. True when the run stops here."""
    last = done == plan["total_steps"]
    stop_early = cfg.trainer.max_steps_this_run is not None and ran >= cfg.trainer.max_steps_this_run
    if done % cfg.trainer.save_checkpoint_steps == 0 or last or stop_early:
        saver.save(done, model, opt, trainer_state(cfg, plan))
    if stop_early and not last:
        LOG.info(f"stopping after {ran} steps (trainer.max_steps_this_run); resume with trainer.resume_training=true")
        return True
    return False
