"""Masked-diffusion SFT: the one training recipe, read top to bottom.

    dreamtune train [config.yaml] key=value ...            # one process (GPU or CPU)
    python -m dreamtune.train [config.yaml] key=value ...
    torchrun --nproc_per_node=N -m dreamtune.train ...     # FSDP2 over N GPUs (gloo on CPU); multi-node too
    dreamtune train --dry-run [config.yaml] key=value ...  # validate, print the resolved config and the plan
    dreamtune train configs/dream7b_gsm8k_grpo.yaml        # trainer.stage=grpo: RL after SFT (dreamtune/grpo.py)

The objective is Dream's (dreamtune/diffusion.py); the batches are Dream's (dreamtune/batching.py);
the model is transformers' own with bidirectional attention (dreamtune/models.py). Every random draw of
optimizer step s comes from generators seeded by (seed, s, rank, micro-batch), so resume is exact.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dreamtune import distributed as D
from dreamtune.atomic import write_json, write_text
from dreamtune.config import load_config, split_argv, to_yaml
from dreamtune.diffusion import forward_loss
from dreamtune.examples import count_rows, load_examples, truncation_line
from dreamtune.monitor import LOG, Monitor, flop_counter, peak_flops, setup_logging
from dreamtune.optim import AdamW, clip_coefficient
from dreamtune.training import (apply_lora, check_run_dir, export_final, lr_lambda, make_optimizer, micro_batches,
                                oom_message, plan_steps, save_when_due, step_generator, trainer_state)

MIN_STEPS_WARNING = 20


# ----------------------------------------------------------------------------------------------- the step


def make_batch(examples, cfg, pad_id: int, generator: torch.Generator):
    from dreamtune.batching import collate, pack

    if cfg.data.packing:
        return pack(examples, max_length=cfg.data.max_length, pad_id=pad_id)
    cutoff = cfg.data.perbatch_cutoff_type if cfg.data.perbatch_cutoff else None
    return collate(examples, max_length=cfg.data.max_length, pad_id=pad_id, cutoff_type=cutoff,
                   resp_cutoff_ratio=cfg.data.resp_cutoff_ratio, generator=generator)


@torch.no_grad()
def validation_loss(lm, val_examples, cfg, pad_id: int, ctx, dev: D.Dist) -> float:
    """Validation loss with fixed masks and noise levels: the same draws at every evaluation."""
    lm.model.eval()
    micro = cfg.data.micro_batch_size_per_gpu
    chunks = [val_examples[i:i + micro] for i in range(0, len(val_examples), micro)][: cfg.data.val_batches * dev.world]
    total = torch.zeros(2, device=dev.device)  # [sum of losses, count]
    for k in range(dev.rank, len(chunks), dev.world):
        g = step_generator(cfg.trainer.seed, 99, k)
        batch = make_batch(chunks[k], cfg, pad_id, g).to(dev.device)
        with ctx:
            loss, _, _ = forward_loss(lm, batch, cfg.diffusion, step_generator(cfg.trainer.seed, 98, k, device=dev.device.type))
        total += torch.stack([loss.detach().float(), torch.ones((), device=dev.device)])
    D.all_reduce_sum(total)
    lm.model.train()
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------------------------- the recipe


def train(cfg) -> Path:
    dev = D.init(cfg.trainer.device)
    setup_logging(None, dev.is_main)
    if (cfg.model.fsdp_config.cpu_offload or cfg.model.fsdp_config.offload_params) and not dev.enabled:
        raise ValueError("model.fsdp_config.cpu_offload needs FSDP: launch with "
                         "`torchrun --nproc_per_node=1 -m dreamtune.train ...` (or more processes)")

    if cfg.model.attn_implementation == "flex_attention" and dev.device.type != "cuda":
        raise ValueError("model.attn_implementation=flex_attention has no backward pass on the CPU; use sdpa there "
                         "(packing then uses an explicit document mask)")
    run_dir = check_run_dir(cfg)  # a file in its way, a read-only disk: now, not after the model has loaded

    # 1. Model and tokenizer. Everything that can fail on user input fails before the run directory exists.
    from dreamtune.models import load

    if cfg.model.trust_remote_code:
        LOG.info("model.trust_remote_code=True is ignored: dreamtune loads Dream without remote code")
    # Full fine-tuning keeps fp32 master weights (bf16 compute). LoRA's frozen base can live in bf16 on one
    # GPU; under FSDP it stays fp32 (sharded), so that each FSDP unit holds parameters of one dtype.
    lora_bf16 = cfg.model.lora_rank > 0 and dev.device.type == "cuda" and cfg.model.dtype == "bf16" and not dev.enabled
    lm = load(cfg.model.partial_pretrain, dtype="bf16" if lora_bf16 else "fp32", attn_implementation=cfg.model.attn_implementation)
    if lm.tokenizer is None:
        raise ValueError(f"{cfg.model.partial_pretrain} has no tokenizer files; training needs one to render the data")
    pad_id = cfg.data.pad_token_id if cfg.data.pad_token_id is not None else lm.tokenizer.pad_token_id
    if cfg.model.offload_embeddings and dev.enabled:
        raise ValueError("model.offload_embeddings=true is for one GPU; under torchrun FSDP2 shards the table "
                         "already (model.fsdp_config.cpu_offload=true moves every parameter to the CPU)")
    if cfg.model.offload_embeddings:
        D.check_embeddings_untied(lm.model)  # here, before the run directory exists

    # 2. Data, rendered exactly as validation (`dreamtune data validate`) counts it.
    train_ex, train_counts = load_examples(cfg.data.train_files, lm.tokenizer, cfg)
    val_ex, val_counts = load_examples(cfg.data.val_files, lm.tokenizer, cfg) if cfg.data.val_files else ([], None)
    plan = plan_steps(cfg, len(train_ex), dev.world)
    if plan["total_steps"] < MIN_STEPS_WARNING:
        LOG.warning(f"warning: this run takes only {plan['total_steps']} optimizer steps ({plan['rows']} rows, global batch "
                    f"{plan['global_batch']}, {cfg.trainer.total_epochs} epochs); lower data.train_batch_size or raise "
                    f"trainer.total_epochs for real training")

    # 3. Trainable parameters: LoRA adapters or everything.
    model = lm.model
    if cfg.model.lora_rank > 0:
        model = apply_lora(model, cfg)

    # 4. The run directory: resume from it, or start it fresh; its checkpoints must fit the disk.
    from dreamtune.checkpoint import STATE, Saver, latest_checkpoint

    resume_from, start = None, 0
    if cfg.trainer.resume_training or cfg.trainer.resume_path:
        resume_from = Path(cfg.trainer.resume_path) if cfg.trainer.resume_path else latest_checkpoint(run_dir)
        if resume_from is None:
            LOG.info(f"trainer.resume_training: no checkpoint in {run_dir}; starting from step 0")
        elif not (resume_from / STATE).exists():
            raise ValueError(f"'{resume_from}' is not a complete dreamtune checkpoint (no {STATE}); point "
                             f"trainer.resume_path at a checkpoint-STEP directory")
        else:
            start = int(json.loads((resume_from / STATE).read_text())["step"])
    sizes = preflight_disk(run_dir, model, lm, cfg, plan, start, dev)  # ValueError before anything is written
    if dev.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a resumed run's config.yaml is rewritten once its checkpoint has loaded
            write_text(run_dir / "config.yaml", to_yaml(cfg))
        write_json(run_dir / "data_summary.json", {"truncation": {"policy": cfg.data.truncation, "max_length": cfg.data.max_length,
                                                                "train": train_counts, "val": val_counts}})
    D.barrier()
    setup_logging(run_dir, dev.is_main)
    if dev.is_main:  # the data's validation report travels with the run: `dreamtune report RUN` shows it
        from dreamtune.validation_files import copy_data_validation

        copy_data_validation(cfg.data.train_files, cfg.data.max_length, run_dir)
    layout = (f"rows in micro-batches of at most {cfg.data.micro_batch_tokens} tokens over {dev.world} process(es)"
              if cfg.data.micro_batch_tokens else f"= {plan['micro_batch']} x {dev.world} x {plan['grad_accum']} accumulation")
    LOG.info(f"dreamtune train: {plan['rows']} rows, {plan['total_steps']} steps ({plan['steps_per_epoch']}/epoch), "
             f"global batch {plan['global_batch']} {layout}, device {dev.device}")
    for what, counts in (("train", train_counts), ("val", val_counts)):
        if counts is not None:
            LOG.info(truncation_line(what, counts, cfg))
    LOG.info(sizes["line"])
    if sizes["warning"]:
        LOG.warning(sizes["warning"])

    # 5. Memory and speed: recomputation, compiled layers, FSDP2 or one device.
    if cfg.model.enable_gradient_checkpointing:
        D.apply_activation_checkpointing(model, cfg.model.checkpoint_every_n_layers)
    if cfg.model.compile and dev.device.type == "cuda":
        D.apply_compile(model)
    compute_dtype = torch.bfloat16 if dev.device.type == "cuda" and cfg.model.dtype == "bf16" else None
    if dev.enabled:
        D.apply_fsdp(model, compute_dtype, cfg.model.fsdp_config.reshard_after_forward, cfg.model.fsdp_config.cpu_offload)
        ctx = nullcontext()  # FSDP2 casts parameters to the compute dtype itself
    else:
        model.to(dev.device)
        ctx = torch.autocast("cuda", dtype=compute_dtype) if compute_dtype else nullcontext()
    if cfg.model.offload_embeddings:
        D.offload_input_embeddings(model)
    lm.model = model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    # 6. Optimizer and schedule (Dream's: AdamW (0.9, 0.95), wd 0.01, cosine with 10% warm-up, clip 1.0).
    opt = make_optimizer(params, cfg, dev.device.type)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, plan["total_steps"], plan["warmup_steps"]))
    if resume_from is not None:
        from dreamtune.checkpoint import load_resumable

        t0 = time.time()
        state = load_resumable(resume_from, model, opt, trainable_only=cfg.model.lora_rank > 0)
        if dev.is_main:
            write_text(run_dir / "config.yaml", to_yaml(cfg))
        sched.last_epoch = start - 1  # LambdaLR recomputes the factor from the step
        sched.step()
        LOG.info(f"resumed from {resume_from} at step {start} in {time.time() - t0:.1f}s")
        if not state.get("optimizer_state", True):
            LOG.info(f"{resume_from.name} holds the weights only (saved with trainer.save_optimizer=false): the AdamW "
                     f"moments restart from zero at step {start}")

    # 7. The loop.
    mon = Monitor(run_dir, cfg, plan["total_steps"], dev.is_main, start_step=start)
    saver = Saver(run_dir, trainable_only=cfg.model.lora_rank > 0, keep_last=cfg.trainer.keep_last,
                  with_optimizer=cfg.trainer.save_optimizer, background=cfg.trainer.async_save, sizes=sizes)
    peak = peak_flops(cfg, dev)  # FLOP/s of all the run's accelerators, or None (MFU not logged)
    flops_of = flop_counter(model, lora=cfg.model.lora_rank > 0)
    seed, ran = cfg.trainer.seed, 0
    try:
        for step in range(start, plan["total_steps"]):
            t0 = time.time()
            totals = torch.zeros(3, device=dev.device)  # [loss, ce, masked] summed over micro-batches, no sync per micro-batch
            counts = [0.0, 0.0]  # [tokens, model FLOPs], counted on the CPU
            for mb, examples, divisor in micro_batches(train_ex, step, plan, dev.rank, seed, cfg.data):
                cpu_batch = make_batch(examples, cfg, pad_id, step_generator(seed, step, mb))
                batch = cpu_batch.to(dev.device)
                if cfg.model.lora_dropout > 0:  # peft's dropout draws from the global generators: seed them too
                    torch.manual_seed(step_generator(seed, step, mb, 2).initial_seed())
                with ctx:
                    loss, ce, n_masked = forward_loss(lm, batch, cfg.diffusion, step_generator(seed, step, mb, 1, device=dev.device.type))
                if math.isinf(divisor):  # a filler: the same calls, no weight
                    (loss * 0.0).backward()
                    continue
                (loss / divisor).backward()  # see micro_batches: every row of the global batch weighs the same
                totals += torch.stack([loss.detach().float() / divisor, ce.detach().float() / divisor, n_masked.float()])
                counts[0] += cpu_batch.n_tokens
                counts[1] += flops_of(cpu_batch)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
            totals = D.all_reduce_sum(torch.cat([totals, torch.tensor(counts, device=dev.device)]))
            loss_val = float(totals[0]) / dev.world
            if not math.isfinite(loss_val) or not math.isfinite(float(grad_norm)):
                raise FloatingPointError(
                    f"loss is {loss_val} (grad norm {float(grad_norm)}) at step {step + 1}; stopping. The last good "
                    f"checkpoint is kept in {run_dir}; lower optim.lr or check the data, then resume")
            lr_used = sched.get_last_lr()[0]
            if isinstance(opt, AdamW):  # clipping folded into the update: one pass over the gradients fewer
                opt.step(grad_scale=clip_coefficient(grad_norm, cfg.optim.clip_grad))
            else:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad, norm)
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            done = step + 1
            ran += 1
            mon.log(done, {"epoch": round(done / plan["steps_per_epoch"], 4), "loss": loss_val,
                           "ce": float(totals[1]) / dev.world, "lr": lr_used,
                           "grad_norm": float(grad_norm), "tokens": int(totals[3]), "masked_tokens": int(totals[2]),
                           "tokens_per_s": float(totals[3]) / dt,
                           **({"mfu": float(totals[4]) / dt / peak} if peak else {}),
                           **({"peak_gib": torch.cuda.max_memory_allocated(dev.device) / 2**30} if dev.device.type == "cuda" else {})})
            last = done == plan["total_steps"]
            if val_ex and (last or (cfg.trainer.val_check_steps and done % cfg.trainer.val_check_steps == 0)):
                mon.log(done, {"val_loss": validation_loss(lm, val_ex, cfg, pad_id, ctx, dev)})
            if save_when_due(cfg, plan, done, ran, saver, model, opt):
                return run_dir
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(oom_message(cfg, plan, dev, sum(p.numel() for p in model.parameters()))) from None
    finally:
        mon.close()
        saver.wait()  # a checkpoint written in the background is finished (and named in `latest`) before exit

    # 8. The final export: bf16 HF directory (LoRA merged), optionally Dream's format too.
    export_final(lm, model, run_dir, cfg, dev)
    LOG.info(f"done: {run_dir}/checkpoint-final (load it with dreamtune.load or AutoModelForCausalLM)")
    return run_dir


def preflight_disk(run_dir: Path, model, lm, cfg, plan: dict, start: int, dev: D.Dist) -> dict:
    """The sizes of this run's checkpoints against the free space of the run directory's disk, before step 1
    (disk.preflight); rank 0 decides for all."""
    from dreamtune.disk import preflight

    result = None
    if dev.is_main:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in make_optimizer(params, cfg, dev.device.type).state_dict()["param_groups"]]
        try:
            result = preflight(run_dir, model, cfg, optimizer_groups=groups, trainer_state=trainer_state(cfg, plan),
                               tokenizer=lm.tokenizer, start=start, total_steps=plan["total_steps"])
        except ValueError as e:
            result = {"error": str(e)}
    result = D.broadcast_object(result)
    if "error" in result:
        raise ValueError(result["error"])
    return result


# ----------------------------------------------------------------------------------------------- entry


def dry_run(cfg) -> int:
    print(to_yaml(cfg), end="")
    check_run_dir(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [f for f in list(cfg.data.train_files) + list(cfg.data.val_files) if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"data file '{missing[0]}' not found; prepare it with 'dreamtune data prepare' or fix data.train_files/val_files")
    from dreamtune.models import check_model_dir

    print(f"# model: {check_model_dir(cfg.model.partial_pretrain)}")  # config, weights, tokenizer; no weights read
    n = count_rows(cfg.data.train_files)
    plan = plan_steps(cfg, n, world)
    print("# plan: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in plan.items()))
    if plan["total_steps"] < MIN_STEPS_WARNING:
        print(f"# warning: only {plan['total_steps']} optimizer steps; lower data.train_batch_size or raise trainer.total_epochs")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    path, overrides, flags = split_argv(argv)
    unknown = [f for f in flags if f != "--dry-run"]
    if unknown:
        raise ValueError(f"unknown option '{unknown[0]}'; options: --dry-run (everything else is key=value)")
    cfg = load_config(path, overrides)
    if cfg.trainer.stage == "grpo":  # reinforcement learning after SFT: its own recipe, dreamtune/grpo.py
        from dreamtune.grpo import run

        return run(cfg, dry="--dry-run" in flags)
    if "--dry-run" in flags:
        return dry_run(cfg)
    missing = [f for f in list(cfg.data.train_files) + list(cfg.data.val_files) if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"data file '{missing[0]}' not found; prepare it with 'dreamtune data prepare' or fix data.train_files/val_files")
    try:
        train(cfg)
    finally:
        D.teardown()
    return 0


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
