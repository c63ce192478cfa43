"""Reinforcement learning after SFT: d1's diffu-GRPO, the one GRPO recipe, read top to bottom.

    dreamtune train configs/dream7b_gsm8k_grpo.yaml key=value ...          # trainer.stage=grpo in the recipe
    torchrun --nproc_per_node=N -m dreamtune.grpo [config.yaml] key=value   # FSDP2 over N GPUs (gloo on CPU)
    dreamtune train --dry-run configs/dream7b_gsm8k_grpo.yaml               # validate, print the config and plan

Each optimizer step: data.train_batch_size prompts (data.micro_batch_size_per_gpu per forward), G =
grpo.num_generations rollouts of each with dreamtune's sampler (the fast one by default), a reward per
rollout from the task's grader (correct: 1) plus grpo.format_reward when it states a readable answer,
advantages normalised within each prompt's group, then grpo.num_iterations clipped policy-gradient updates
on those rollouts, each with a per-token log-probability estimated in one forward pass: the completion
fully masked, each prompt token masked with probability grpo.p_mask_prompt (one mask seed per inner
iteration), and an optional KL term (grpo.beta) to the frozen reference: the base with the LoRA adapters
switched off, or a frozen copy for a full fine-tune. Model loading, LoRA, FSDP2, the optimizer, the
schedule, checkpoints, logging and the final export are dreamtune/train.py's. Every random draw of step s
comes from generators seeded by (seed, step, micro-batch, ...), so rollouts and resume are exact.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamtune import distributed as D
from dreamtune.atomic import write_text
from dreamtune.checkpoint import Saver
from dreamtune.config import to_yaml
from dreamtune.grpo_prompts import check_prompt_source, grade_completions, load_prompts
from dreamtune.monitor import LOG, Monitor, setup_logging
from dreamtune.optim import AdamW, clip_coefficient
from dreamtune.training import (apply_lora, check_run_dir, export_final, lr_lambda, make_optimizer, micro_batches,
                                oom_message, plan_steps, save_when_due, step_generator)

ADV_EPS = 1e-4  # TRL's and d1's: a group whose rewards are all equal gets advantage 0, not 0/0

# ----------------------------------------------------------------------------------------------- the maths


def group_advantages(rewards: torch.Tensor, group: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), rewards [B*G] in consecutive groups of G -> [B*G].
    The std is the sample standard deviation (Bessel's n - 1, torch.std's default), as TRL and d1 compute it."""
    assert rewards.dim() == 1 and rewards.numel() % group == 0, (rewards.shape, group)
    r = rewards.float().view(-1, group)  # [B, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1.0 for each completion token up to and including its first stop token, 0.0 after. [B, C] -> [B, C]."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))  # [B, C]
    stops_before = is_stop.long().cumsum(1) - is_stop.long()  # stop tokens strictly before each position
    return (stops_before == 0).float()


def prompt_noise(prompt_mask: torch.Tensor, p_mask: float, generator: torch.Generator, group: int = 1) -> torch.Tensor:
    """Which prompt tokens to mask: each real (non-pad) token with probability p_mask. [B, P] -> bool [B, P].
    group > 1: one draw per `group` consecutive rows (the rollouts of one prompt share their mask); group 1 is
    one draw per row, d1's (and the same numbers as before the option existed)."""
    b, p = prompt_mask.shape
    assert b % group == 0, (b, group)
    u = torch.rand((b // group, p), generator=generator, device=prompt_mask.device)
    if group > 1:
        u = u.repeat_interleave(group, dim=0)
    return (u < p_mask) & (prompt_mask != 0)


def completion_logprobs(lm, prompt_ids, prompt_mask, completion_ids, p_mask_prompt: float,
                        generator: torch.Generator, group: int = 1) -> torch.Tensor:
    """d1's one-forward estimate of log p(completion token | prompt): the completion fully masked, the prompt
    (left-padded, prompt_mask 1 = real) randomly masked (one mask per `group` consecutive rows: prompt_noise);
    the log-probability of each completion token at its own position (lm.logits applies the shift).
    prompt [B, P], completion [B, C] -> [B, C] float32."""
    b, p = prompt_ids.shape
    c = completion_ids.shape[1]
    noisy = prompt_ids.masked_fill(prompt_noise(prompt_mask, p_mask_prompt, generator, group), lm.mask_token_id)
    x = torch.cat([noisy, completion_ids.new_full((b, c), lm.mask_token_id)], dim=1)  # [B, P + C]
    keys = torch.cat([prompt_mask, prompt_mask.new_ones((b, c))], dim=1)  # [B, P + C]: pads are not attended
    scored = torch.zeros_like(x, dtype=torch.bool)
    scored[:, p:] = True
    logits = lm.logits(x, attention_mask=keys, positions=scored).float().view(b, c, -1)  # [B, C, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [B, C]


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float, beta: float):
    """The clipped GRPO objective, negated. logp/old_logp/ref_logp [B, C] (ref_logp None: no KL), advantages [B],
    mask [B, C] (completion_mask). Per token: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta KL, with KL
    the k3 estimator exp(ref - logp) - (ref - logp) - 1; averaged over each completion's own tokens, then over
    completions. Returns (loss, clip fraction over all counted tokens, KL averaged as the loss)."""
    ratio = torch.exp(logp - old_logp)  # [B, C]
    a = advantages[:, None]  # [B, 1]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)  # [B, C]
    n_tok = mask.sum(1).clamp(min=1)  # [B]
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        d = ref_logp - logp
        kl_tok = torch.exp(d) - d - 1  # [B, C], >= 0
        per_token = per_token + beta * kl_tok
        kl = ((kl_tok * mask).sum(1) / n_tok).mean().detach()
    loss = ((per_token * mask).sum(1) / n_tok).mean()
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))  # the min picked the clip
    clip_frac = (clipped.float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, clip_frac.detach(), kl


# ----------------------------------------------------------------------------------------------- rollouts


@contextmanager
def full_parameters(model, reshard_after_forward: bool = True):
    """FSDP2: every shard all-gathered once, and kept until the end (no collective inside): the ranks' samplers
    run different numbers of steps (rows stop early), and the fast sampler calls the layers' submodules past
    FSDP's forward hooks. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward and m is not model, recurse=False)


@torch.no_grad()
def rollout(lm, rows: list[dict], cfg, generator: torch.Generator, cuda_graphs: bool) -> dict:
    """G completions of each prompt of one micro-batch, graded. Tensors [n*G, ...], groups consecutive."""
    from dreamtune.engine import decode_answer, generate, left_pad, sampler_with

    g = cfg.grpo
    prompts = [r["ids"] for r in rows for _ in range(g.num_generations)]
    answers = [r["answer"] for r in rows for _ in range(g.num_generations)]
    ids, mask = left_pad(prompts, lm.tokenizer.pad_token_id, lm.device)  # [nG, P] each
    width = ids.shape[1]
    sampler = sampler_with(g.alg, steps=g.steps, temperature=g.temperature, threshold=g.threshold,
                           block_length=g.block_length, cuda_graphs=cuda_graphs)
    with full_parameters(lm.model, cfg.model.fsdp_config.reshard_after_forward):
        out = generate(lm, ids, mask, sampler, max_new_tokens=g.max_new_tokens, generator=generator)
    completion = out.sequences[:, width:]  # [nG, C]
    texts = [decode_answer(lm, t, skip_special_tokens=True)[0] for t in completion.tolist()]
    correct, readable = grade_completions(g.task, g.prompt_format, texts, answers)
    rewards = torch.tensor([float(c) + g.format_reward * float(f) for c, f in zip(correct, readable)], device=lm.device)
    return {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion,
            "completion_mask": completion_mask(completion, lm.stop_ids), "rewards": rewards,
            "correct": torch.tensor(correct, dtype=torch.float32, device=lm.device),
            "advantages": group_advantages(rewards, g.num_generations)}


@dataclass
class Reference:
    """The frozen reference policy: `lm` run inside `off()` (LoRA: the policy with its adapters disabled)."""

    lm: object
    off: object = nullcontext

    @torch.no_grad()
    def logprobs(self, batch: dict, p_mask: float, generator: torch.Generator, group: int = 1) -> torch.Tensor:
        with self.off():
            return completion_logprobs(self.lm, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                       p_mask, generator, group)


def make_reference(cfg, lm, model, dev, compute_dtype) -> Reference | None:
    """None without a KL term; LoRA: no copy (the base is frozen already); a full fine-tune: a frozen copy."""
    if cfg.grpo.beta == 0:
        return None
    if cfg.model.lora_rank > 0:
        return Reference(lm, model.disable_adapter)
    from dreamtune.models import load

    ref = load(cfg.model.partial_pretrain, dtype="fp32", attn_implementation=cfg.model.attn_implementation)
    ref.model.requires_grad_(False)
    if dev.enabled:
        D.apply_fsdp(ref.model, compute_dtype, True, cfg.model.fsdp_config.cpu_offload)
    else:
        ref.model.to(dev.device)
    return Reference(ref)


# ----------------------------------------------------------------------------------------------- the recipe


def train(cfg) -> Path:
    from dreamtune.models import load

    dev = D.init(cfg.trainer.device)
    setup_logging(None, dev.is_main)
    run_dir = check_run_dir(cfg)  # before the model loads
    g, seed = cfg.grpo, cfg.trainer.seed
    group = g.num_generations if g.prompt_mask_per_group else 1  # rows sharing one prompt mask

    # 1. Model, tokenizer and prompts: everything that can fail on user input fails before the run directory exists.
    lora_bf16 = cfg.model.lora_rank > 0 and dev.device.type == "cuda" and cfg.model.dtype == "bf16" and not dev.enabled
    lm = load(cfg.model.partial_pretrain, dtype="bf16" if lora_bf16 else "fp32", attn_implementation=cfg.model.attn_implementation)
    if lm.tokenizer is None:
        raise ValueError(f"{cfg.model.partial_pretrain} has no tokenizer files; GRPO needs one to render prompts and grade answers")
    prompts = load_prompts(cfg, lm)
    plan = plan_steps(cfg, len(prompts), dev.world)

    # 2. The run directory: resume from it, or start it fresh.
    resume_from = None
    if cfg.trainer.resume_training or cfg.trainer.resume_path:
        from dreamtune.checkpoint import STATE, latest_checkpoint

        resume_from = Path(cfg.trainer.resume_path) if cfg.trainer.resume_path else latest_checkpoint(run_dir)
        if resume_from is not None and not (resume_from / STATE).exists():
            raise ValueError(f"'{resume_from}' is not a complete dreamtune checkpoint (no {STATE}); point "
                             f"trainer.resume_path at a checkpoint-STEP directory")
    if dev.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            write_text(run_dir / "config.yaml", to_yaml(cfg))
    D.barrier()
    setup_logging(run_dir, dev.is_main)
    LOG.info(f"dreamtune grpo: {len(prompts)} prompts, {plan['total_steps']} steps of {plan['global_batch']} prompts x "
             f"{g.num_generations} rollouts ({plan['micro_batch']} prompts per forward), {g.num_iterations} updates "
             f"each, device {dev.device}")

    # 3. Trainable parameters (LoRA or everything), FSDP2, the reference, optimizer and schedule: as train.py.
    model = lm.model
    if cfg.model.lora_rank > 0:
        model = apply_lora(model, cfg)
    if cfg.model.enable_gradient_checkpointing:
        D.apply_activation_checkpointing(model, cfg.model.checkpoint_every_n_layers)
    compute_dtype = torch.bfloat16 if dev.device.type == "cuda" and cfg.model.dtype == "bf16" else None
    if dev.enabled:
        D.apply_fsdp(model, compute_dtype, cfg.model.fsdp_config.reshard_after_forward, cfg.model.fsdp_config.cpu_offload)
        ctx = nullcontext()
    else:
        model.to(dev.device)
        ctx = torch.autocast("cuda", dtype=compute_dtype) if compute_dtype else nullcontext()
    lm.model = model
    ref = make_reference(cfg, lm, model, dev, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, dev.device.type)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, plan["total_steps"], plan["warmup_steps"]))
    start = 0
    if resume_from is not None:
        from dreamtune.checkpoint import load_resumable

        start = int(load_resumable(resume_from, model, opt, trainable_only=cfg.model.lora_rank > 0)["step"])
        if dev.is_main:
            write_text(run_dir / "config.yaml", to_yaml(cfg))
        sched.last_epoch = start - 1
        sched.step()
        LOG.info(f"resumed from {resume_from} at step {start}")

    # 4. The loop: rollouts, then num_iterations clipped updates on them.
    mon = Monitor(run_dir, cfg, plan["total_steps"], dev.is_main, start_step=start)
    saver = Saver(run_dir, trainable_only=cfg.model.lora_rank > 0, keep_last=cfg.trainer.keep_last,
                  with_optimizer=cfg.trainer.save_optimizer, background=cfg.trainer.async_save)
    gen_dev, ran = dev.device.type, 0
    # the fast sampler replays CUDA graphs: autocast must not cache bf16 weight copies that outlive the capture
    roll_ctx = torch.autocast("cuda", dtype=compute_dtype, cache_enabled=False) if compute_dtype and not dev.enabled else ctx
    try:
        for step in range(start, plan["total_steps"]):
            t0 = time.time()
            model.eval()  # rollouts and the old/reference log-probabilities without dropout
            batches = []
            for mb, rows, _ in micro_batches(prompts, step, plan, dev.rank, seed, cfg.data):  # mb: place in the global batch
                with roll_ctx:
                    batch = rollout(lm, rows, cfg, step_generator(seed, step, mb, 3, device=gen_dev),
                                    cuda_graphs=not dev.enabled)
                batches.append((mb, batch))
            t_roll = time.time() - t0
            with torch.no_grad(), ctx:  # per inner iteration: its own prompt mask, the same for old, ref and new
                for mb, b in batches:
                    masks = [lambda it=it: step_generator(seed, step, mb, 4, it, device=gen_dev) for it in range(g.num_iterations)]
                    b["mask_gen"] = masks
                    b["old"] = [completion_logprobs(lm, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                    g.p_mask_prompt, m(), group) for m in masks] if g.num_iterations > 1 else None
                    b["ref"] = [ref.logprobs(b, g.p_mask_prompt, m(), group) for m in masks] if ref is not None else None
            model.train()
            totals = torch.zeros(4, device=dev.device)  # [loss, clip fraction, kl, micro-batch updates]
            lr_used = sched.get_last_lr()[0]
            for it in range(g.num_iterations):
                for mb, b in batches:
                    if cfg.model.lora_dropout > 0:  # peft's dropout draws from the global generators: seed them
                        torch.manual_seed(step_generator(seed, step, mb, 5, it).initial_seed())
                    with ctx:
                        logp = completion_logprobs(lm, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                   g.p_mask_prompt, b["mask_gen"][it](), group)
                        old = b["old"][it] if b["old"] is not None else logp.detach()
                        loss, clip, kl = grpo_loss(logp, old, b["ref"][it] if b["ref"] is not None else None,
                                                   b["advantages"], b["completion_mask"], g.epsilon, g.beta)
                    (loss / plan["grad_accum"]).backward()
                    totals += torch.stack([loss.detach(), clip, kl, torch.ones((), device=dev.device)])
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                if not math.isfinite(float(grad_norm)):
                    raise FloatingPointError(f"grad norm is {float(grad_norm)} at step {step + 1}; stopping. The last good "
                                             f"checkpoint is kept in {run_dir}; lower optim.lr, then resume")
                if isinstance(opt, AdamW):
                    opt.step(grad_scale=clip_coefficient(grad_norm, cfg.optim.clip_grad))
                else:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad, norm)
                    opt.step()
                opt.zero_grad(set_to_none=True)
            sched.step()
            t_update = time.time() - t0 - t_roll

            # 5. Logging: every number summed over ranks first.
            rewards = torch.cat([b["rewards"] for _, b in batches])
            cmask = torch.cat([b["completion_mask"] for _, b in batches])
            sums = torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.cat([b["correct"] for _, b in batches]).sum(),
                                torch.tensor(float(rewards.numel()), device=dev.device), cmask.sum()])
            D.all_reduce_sum(sums)
            D.all_reduce_sum(totals)
            n = float(sums[3])
            mean = float(sums[0]) / n
            done, ran = step + 1, ran + 1
            # the keys are grpo_config.METRICS, the names `dreamtune report` reads
            row = {"loss": float(totals[0] / totals[3]), "reward_mean": mean,
                   "reward_std": math.sqrt(max(0.0, float(sums[1]) / n - mean ** 2)), "accuracy": float(sums[2]) / n,
                   "clip_fraction": float(totals[1] / totals[3]), "completion_length": float(sums[4]) / n,
                   "lr": lr_used, "grad_norm": float(grad_norm), "rollout_s": t_roll, "update_s": t_update,
                   "tokens_per_s": n * g.max_new_tokens / max(t_roll, 1e-9)}
            if ref is not None:
                row["kl"] = float(totals[2] / totals[3])
            mon.log(done, row)
            if save_when_due(cfg, plan, done, ran, saver, model, opt):
                return run_dir
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(oom_message(cfg, plan, dev, sum(p.numel() for p in model.parameters()))) from None
    finally:
        mon.close()
        saver.wait()  # a checkpoint written in the background is finished before the export

    # 6. The final export, as SFT's: a bf16 HF directory (LoRA merged) that eval, demo and generate load.
    export_final(lm, model, run_dir, cfg, dev)
    LOG.info(f"done: {run_dir}/checkpoint-final")
    return run_dir


# ----------------------------------------------------------------------------------------------- entry


def dry_run(cfg) -> int:
    """Validate a GRPO recipe without loading weights: the config, the prompts file, the model directory, the plan."""
    import os

    from dreamtune.models import check_model_dir

    print(to_yaml(cfg), end="")
    check_run_dir(cfg)
    g = cfg.grpo
    n = check_prompt_source(cfg)
    print(f"# model: {check_model_dir(cfg.model.partial_pretrain)}")
    plan = plan_steps(cfg, n, int(os.environ.get("WORLD_SIZE", "1")))
    print("# plan: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in plan.items()))
    print(f"# grpo: {g.task} prompts from {g.prompts_file} ({g.prompt_format}), {g.num_generations} rollouts each "
          f"({g.alg}, {g.max_new_tokens} tokens), {g.num_iterations} updates per batch, beta {g.beta}")
    return 0


def run(cfg, dry: bool = False) -> int:
    """`dreamtune train` with trainer.stage=grpo lands here."""
    if dry:
        return dry_run(cfg)
    try:
        train(cfg)
    finally:
        D.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dreamtune.grpo` / `torchrun -m dreamtune.grpo`: `dreamtune train` with trainer.stage=grpo."""
    from dreamtune.config import load_config, split_argv

    path, overrides, flags = split_argv(list(sys.argv[1:] if argv is None else argv))
    unknown = [f for f in flags if f != "--dry-run"]
    if unknown:
        raise ValueError(f"unknown option '{unknown[0]}'; options: --dry-run (everything else is key=value)")
    return run(load_config(path, [*overrides, "trainer.stage=grpo"]), dry="--dry-run" in flags)


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
