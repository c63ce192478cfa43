"""FSDP2 scaling on one host: dreamtune's training step on N GPUs against 1, same global batch.

    torchrun --nproc_per_node=1 bench/fsdp_scaling.py            # the reference run (one GPU)
    torchrun --nproc_per_node=8 bench/fsdp_scaling.py            # then 2, 4 or 8 GPUs
    torchrun --nproc_per_node=2 bench/fsdp_scaling.py --tiny     # CPU smoke run on gloo

A random-initialised Qwen2 of Dream-v0-Base-7B's shape, built on the meta device, sharded with dreamtune's
`apply_fsdp` (bf16 compute, fp32 master weights and reductions) and initialised shard by shard from a
per-parameter seed, so every world size starts from the same weights. Each step trains the same global
batch (rows are split across ranks; every micro-batch's noise is seeded by its place in the global batch,
as in dreamtune.train), so the per-step losses must match the one-GPU run up to reduction order.
Reports per-step losses, tokens/s per GPU, peak memory per GPU, and the time to save and to load a
resumable checkpoint (dreamtune.checkpoint, torch.distributed.checkpoint shards). Rank 0 writes
$OUT/fsdp_scaling_N.json (or bench/results/). Scaling efficiency = tokens/s per GPU at N / at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import DREAM7B, MASK_ID, TINY, fill_random_, make_rows  # noqa: E402

from dreamtune import distributed as D  # noqa: E402
from dreamtune.batching import collate  # noqa: E402
from dreamtune.models import DiffusionLM  # noqa: E402


def build_sharded(shape: dict, dev: torch.device, compute_dtype):
    """Meta model -> FSDP2 -> materialised shards, each initialised from its full tensor's own seed."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{k: v for k, v in shape.items() if k != "rope_theta"},
                      rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]}, tie_word_embeddings=False)
    cfg.is_causal = False
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    D.apply_activation_checkpointing(model, 1)
    D.apply_fsdp(model, compute_dtype)
    model.to_empty(device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
            full = torch.empty(p.shape, device=dev)
            fill_random_(name, full, g)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(dev)  # a buffer to_empty left empty
    return model


def main() -> None:
    from omegaconf import OmegaConf

    from dreamtune.checkpoint import load_resumable, save_resumable
    from dreamtune.config import TrainConfig
    from dreamtune.diffusion import forward_loss
    from dreamtune.training import step_generator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU/gloo smoke run with a tiny model")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 8; tiny 3)")
    ap.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step (a multiple of the world size)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; tiny 32)")
    ap.add_argument("--no-checkpoint", action="store_true", help="skip the save/load timing")
    a = ap.parse_args()

    d = D.init("cpu" if a.tiny else "auto")
    if not dist.is_initialized():
        raise SystemExit("run under torchrun (see the docstring)")
    shape = TINY if a.tiny else DREAM7B
    steps, seq = a.steps or (3 if a.tiny else 8), a.seq or (32 if a.tiny else 2048)
    if a.global_batch % d.world:
        raise SystemExit(f"--global-batch {a.global_batch} is not a multiple of {d.world} ranks")
    accum = a.global_batch // d.world
    compute = torch.bfloat16 if d.device.type == "cuda" else None
    model = build_sharded(shape, d.device, compute)
    model.train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=d.device.type == "cuda")
    lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=MASK_ID % shape["vocab_size"], shift=True)
    cfg = OmegaConf.structured(TrainConfig)
    rows = make_rows(a.global_batch, seq, shape["vocab_size"], torch.Generator().manual_seed(1))
    mine = rows[d.rank * accum:(d.rank + 1) * accum]
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    losses, times = [], []
    for step in range(steps):
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device=d.device)
        for k, row in enumerate(mine):
            mb = d.rank * accum + k  # the micro-batch's place in the global batch: same noise at any world size
            batch = collate([row], max_length=seq, pad_id=0).to(d.device)
            loss, _, _ = forward_loss(lm, batch, cfg.diffusion, step_generator(0, step, mb, 1, device=d.device.type))
            (loss / accum).backward()
            total += loss.detach()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        D.all_reduce_sum(total)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(total) / a.global_batch)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if d.is_main:
            print(f"step {step + 1}: loss {losses[-1]:.6f} grad_norm {gn:.6f} {times[-1]:.3f}s", flush=True)

    timed = times[2:] if len(times) > 3 else times[1:] or times  # the first steps include warm-up
    step_s = sorted(timed)[len(timed) // 2]
    res = {"world_size": d.world, "device": torch.cuda.get_device_name() if d.device.type == "cuda" else "cpu",
           "shape": "tiny" if a.tiny else "dream-7b", "global_batch": a.global_batch, "seq": seq, "losses": losses,
           "step_s": step_s, "tokens_per_s_per_gpu": a.global_batch * seq / step_s / d.world,
           "peak_gib_per_gpu": torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else None}
    if not a.no_checkpoint:
        ckdir = Path(D.broadcast_object(tempfile.mkdtemp(prefix="fsdp-ck-") if d.is_main else None))
        t0 = time.perf_counter()
        save_resumable(ckdir, steps, model, opt, {"bench": True}, trainable_only=False, keep_last=1)
        res["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_resumable(ckdir / f"checkpoint-{steps}", model, opt, trainable_only=False)
        D.barrier()
        res["load_s"] = time.perf_counter() - t0
    if d.is_main:
        out = Path(os.environ.get("OUT", "bench/results"))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"fsdp_scaling_{d.world}.json").write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    D.teardown()


if __name__ == "__main__":
    main()
