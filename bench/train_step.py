"""Training-step benchmark on one GPU: dreamtune's step against a naive Hugging Face step, Dream-7B shape.

    python bench/train_step.py                 # the H200 measurement (about 6 minutes)
    python bench/train_step.py --tiny          # a CPU smoke run of the same code paths
    python bench/train_step.py --only naive,full --shapes 2x2048

A random-initialised model of Dream-v0-Base-7B's shape (Qwen2: hidden 3584, 28 layers, 28 heads, 4 KV
heads, intermediate 18944, vocab 152064; 7.6B parameters). For each variant and shape: median step time,
tokens/s, model FLOPs utilisation (6N + attention per token, against 989 TFLOP/s dense bf16) and peak
memory. Variants:
  naive     transformers Qwen2 (is_causal=False, sdpa), activation checkpointing, FULL logits and a float32
            cross-entropy over all positions (ignore_index outside the masked ones), fp32 weights, fused
            AdamW, bf16 autocast: the obvious way.
  full      dreamtune's step (diffusion.forward_loss): logits only at masked positions, chunked CE; same
            weights/optimizer/autocast; checkpointing on every layer.
  full-ac2  the same, checkpointing every other layer (less recomputation, more memory).
  full-compile  `full` with each decoder layer torch.compiled.
  full-fast  compiled layers and checkpointing every other layer.
  full-noac  compiled layers, no checkpointing (fits only with room for every layer's activations).
  full-fsdp1  full-fast under FSDP2 on a group of one (bf16 weights gathered once per step, no autocast);
            what `torchrun --nproc_per_node=1 -m dreamtune.train ... model.fsdp_config.reshard_after_forward=false`
            runs.
  full-lean  full-fast with the AdamW moments in bf16 (optim.state_dtype=bfloat16, dreamtune.optim: fp32
            maths, one compiled kernel per parameter, gradient clipping folded into it): 12 bytes per
            parameter instead of 16.
  full-lean-noac  full-lean without checkpointing: the 28 GiB the bf16 moments free hold the activations.
  full-lean-budget  full-lean-noac with torch._functorch.config.activation_memory_budget = 0.5: the
            compiler recomputes the cheapest ops in the backward instead of saving them.
  lora      peft LoRA r16 on all linear layers, bf16 frozen base, checkpointing: dreamtune's LoRA step.
  lora-lean  lora with the adapters' AdamW moments in bf16 (40M adapter parameters: 0.3 GiB less).
  lora-compile  lora-lean with compiled layers (fused elementwise work saves fewer activations).
  lora-offload  lora-compile with the frozen input embeddings in CPU memory (model.offload_embeddings=true).
  packing   useful (non-pad) tokens/s, packed rows (flex_attention, document block mask) vs rows padded to
            max_length (Dream's default), over a spread of lengths like s1K questions + solutions.
Each run also reports peak_by_phase_gib and time_by_phase_s: the peak memory and the clock (cumulative)
after the forward, the backward and the optimizer step of one instrumented step. Prints a table and writes JSON ($OUT/train_step.json when
$OUT is set).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from dreamtune.batching import Batch, collate, pack  # noqa: E402
from dreamtune.config import TrainConfig  # noqa: E402
from dreamtune.models import DiffusionLM  # noqa: E402
from dreamtune.diffusion import forward_loss  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
DREAM7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=1000, max_position_embeddings=4096, rope_theta=1e6)
MASK_ID = 151666


def fill_random_(name: str, t: torch.Tensor, g: torch.Generator) -> None:
    """The benchmarks' random initialisation of one parameter: norms 1, biases 0, the rest N(0, 0.02)."""
    if "norm" in name:
        t.fill_(1.0)
    elif name.endswith("bias"):
        t.zero_()
    else:
        t.normal_(0, 0.02, generator=g)


def build(shape: dict, device, dtype=torch.float32, attn="sdpa", seed: int = 0, **config):
    """A random model of the given shape, allocated directly on the device (meta -> to_empty -> init)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{k: v for k, v in shape.items() if k != "rope_theta"},
                      rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
                      tie_word_embeddings=False, attn_implementation=attn, **config)
    cfg.is_causal = False
    return materialise(Qwen2ForCausalLM, cfg, device, dtype, seed)


def materialise(model_cls, cfg, device, dtype=torch.float32, seed: int = 0):
    """model_cls(cfg) with random weights (fill_random_), allocated directly on the device: built on meta,
    cast there, then to_empty and initialised in place (seconds for 8B parameters instead of minutes)."""
    with torch.device("meta"):
        model = model_cls(cfg).to(dtype)  # cast on meta: the device never holds another copy
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_random_(name, p, g)
        # the rotary module's inv_freq buffer was left empty by to_empty: build it again
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(n: int, shape: dict, seq: int) -> float:
    """6N for the weights plus attention: 12 * layers * hidden * seq (forward+backward, QK^T and AV)."""
    return 6 * n + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def make_rows(B: int, L: int, vocab: int, g: torch.Generator):
    """B examples of total length L: a 128-token prompt and the rest response (ending in eos)."""
    P = min(128, L // 4)
    return [(torch.randint(100, vocab - 10, (P,), generator=g).tolist(),
             torch.randint(100, vocab - 10, (L - P - 1,), generator=g).tolist() + [0]) for _ in range(B)]


def naive_loss(model, batch: Batch, mask_id: int, g: torch.Generator):
    """The obvious step: full logits, float32 CE over every position, ignore_index outside the masked ones."""
    t = torch.rand(batch.input_ids.shape[0], device=batch.input_ids.device, generator=g)
    masked = batch.maskable & (torch.rand(batch.input_ids.shape, device=batch.input_ids.device, generator=g) < t[:, None])
    noisy = torch.where(masked, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
    logits = model(input_ids=noisy).logits  # [B, L, V]
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's shift
    labels = torch.where(masked, batch.input_ids, torch.full_like(batch.input_ids, -100))
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="none").view(labels.shape)
    return (ce / t[:, None]).sum() / masked.sum().clamp(min=1)


def time_steps(step, warmup: int, iters: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


# name -> how dreamtune's step is set up: compiled layers, checkpoint every k layers (0: none), AdamW moments
# dtype (bf16: dreamtune.optim.AdamW with clipping folded into its update), LoRA (bf16 frozen base).
VARIANTS = {
    "full": dict(compile=False, ac=1, moments="fp32"),
    "full-ac2": dict(compile=False, ac=2, moments="fp32"),
    "full-compile": dict(compile=True, ac=1, moments="fp32"),
    "full-fast": dict(compile=True, ac=2, moments="fp32"),
    "full-noac": dict(compile=True, ac=0, moments="fp32"),
    "full-fsdp1": dict(compile=True, ac=2, moments="fp32", fsdp=True),
    "full-lean": dict(compile=True, ac=2, moments="bf16"),
    "full-lean-noac": dict(compile=True, ac=0, moments="bf16"),
    # the compiler's partitioner recomputes cheap ops (weight casts first) to keep half the activations
    "full-lean-budget": dict(compile=True, ac=0, moments="bf16", budget=0.5),
    "lora": dict(compile=False, ac=1, moments="fp32", lora=True),
    "lora-lean": dict(compile=False, ac=1, moments="bf16", lora=True),
    "lora-compile": dict(compile=True, ac=1, moments="bf16", lora=True),
    "lora-offload": dict(compile=True, ac=1, moments="bf16", lora=True, offload=True),
}


def setup_variant(name: str, shape: dict, B: int, L: int, device, model_fn=None, shift: bool = True,
                  mask_id: int | None = None, overrides: tuple[str, ...] = ()):
    """(step, n_params, phases): one training step of the variant as a closure over its model, optimizer
    and batch; phases (a dict or None) collects the peak memory and time after each phase of a step.
    Another architecture (bench/llada.py): model_fn(shape, device, dtype=...) builds it, shift and mask_id
    describe it, overrides are trainer settings (e.g. "diffusion.objective=llada")."""
    from dreamtune import distributed as D
    from dreamtune.optim import AdamW, clip_coefficient

    v = VARIANTS.get(name, dict(compile=False, ac=1, moments="fp32"))  # naive: checkpointing, torch AdamW
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # no compiled graph from an earlier variant (another memory budget) is reused
    torch._functorch.config.activation_memory_budget = v.get("budget", 1.0)
    lora = v.get("lora", False)
    model = (model_fn or build)(shape, device, dtype=torch.bfloat16 if lora and cuda else torch.float32)
    if cuda:  # the peak of building (fp32 before the bf16 cast) is not the step's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    n = n_params(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if v.get("offload"):
        D.offload_input_embeddings(model)
    if v["ac"]:
        D.apply_activation_checkpointing(model, v["ac"])
    if v["compile"] and cuda:
        D.apply_compile(model)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if v.get("fsdp"):
        # FSDP2 on a group of one: the bf16 copy of the weights is made once per forward by the (trivial)
        # all-gather and kept for the backward (no reshard), instead of autocast casting on every pass
        # and again in the recompute (~18% of the step in bench/results/profile_full_2x2048.txt).
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        D.apply_fsdp(model, torch.bfloat16 if cuda else None, reshard_after_forward=False)
        ctx = torch.autocast("cpu", enabled=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    folded = v["moments"] == "bf16"
    if folded:
        opt = AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, state_dtype=torch.bfloat16)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=cuda)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(list(overrides)))
    mask_id = MASK_ID % shape["vocab_size"] if mask_id is None else mask_id
    lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=mask_id, shift=shift)
    g = torch.Generator(device=device).manual_seed(0)
    rows = make_rows(B, L, shape["vocab_size"], torch.Generator().manual_seed(1))
    batch = collate(rows, max_length=L, pad_id=0).to(device)
    phases = {"on": False}

    def mark(phase):
        if cuda and phases["on"]:
            torch.cuda.synchronize()
            phases[phase] = (round(torch.cuda.max_memory_allocated() / 2**30, 2), round(time.perf_counter() - phases["t0"], 4))

    def step():
        if cuda and phases["on"]:
            torch.cuda.synchronize()
            phases["t0"] = time.perf_counter()
        with ctx, record_function("phase:forward"):
            if name == "naive":
                loss = naive_loss(model, batch, lm.mask_token_id, g)
            else:
                loss, _, _ = forward_loss(lm, batch, cfg.diffusion, g)
        mark("forward")
        with record_function("phase:backward"):
            loss.backward()
        mark("backward")
        with record_function("phase:optimizer"):
            if folded:  # what train.py does with optim.state_dtype=bfloat16
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                opt.step(grad_scale=clip_coefficient(norm.full_tensor() if hasattr(norm, "full_tensor") else norm, 1.0))
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
        mark("optimizer")

    return step, n, phases


def run_variant(name: str, shape: dict, B: int, L: int, device, warmup: int, iters: int, **setup) -> dict:
    """Time `warmup` + `iters` steps of a variant (setup: setup_variant's keyword arguments)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step, n, phases = setup_variant(name, shape, B, L, device, **setup)
    try:
        times = time_steps(step, warmup, iters, device)
        med = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        tok = B * L
        res = {"variant": name, "shape": f"{B}x{L}", "params": n, "step_s": med, "tokens_per_s": tok / med,
               "mfu": flops_per_token(n, shape, L) * tok / med / PEAK_FLOPS, "peak_gib": peak, "times": times}
        if device.type == "cuda":  # one more step, reading the peak and the clock after each phase
            before = round(torch.cuda.memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
            phases["on"] = True
            step()
            res["peak_by_phase_gib"] = {"before_step": before, **{k: phases[k][0] for k in ("forward", "backward", "optimizer")}}
            res["time_by_phase_s"] = {k: phases[k][1] for k in ("forward", "backward", "optimizer")}  # cumulative
    except torch.cuda.OutOfMemoryError:
        res = {"variant": name, "shape": f"{B}x{L}", "params": n, "error": "out of memory",
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    # the model, optimizer and batch go with this frame (the caller empties the CUDA cache)
    return res


def s1k_like_lengths(n: int, g: torch.Generator, max_length: int) -> list[int]:
    """Lengths of s1K question+solution rows rendered with the Dream tokenizer (bench/s1k_lengths.json,
    made from the s1K questions and solutions by bench/s1k_lengths.py), or a log-normal stand-in when absent."""
    p = Path(__file__).with_name("s1k_lengths.json")
    if p.exists():
        lengths = json.loads(p.read_text())["total"]
        idx = torch.randint(len(lengths), (n,), generator=g).tolist()
        return [min(lengths[i], max_length) for i in idx]
    return [int(min(max_length, max(32, math.exp(6.0 + 0.7 * float(torch.randn((), generator=g)))))) for _ in range(n)]


def run_packing(shape: dict, device, max_length: int, rows_per_step: int, steps: int, tiny: bool) -> dict:
    """Useful tokens/s: the same rows, padded to max_length (Dream's default) vs packed (flex_attention)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from dreamtune import distributed as D

    attn = "flex_attention" if device.type == "cuda" else "sdpa"
    model = build(shape, device, attn=attn)
    D.apply_activation_checkpointing(model, 1)
    model.train()
    lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=MASK_ID % shape["vocab_size"], shift=True)
    cfg = OmegaConf.structured(TrainConfig)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    g = torch.Generator().manual_seed(2)
    lengths = s1k_like_lengths(rows_per_step * steps, g, max_length)
    rows = [([5] * min(64, n // 4), [7] * (n - min(64, n // 4) - 1) + [0]) for n in lengths]
    useful = sum(lengths)
    out = {"lengths": {"n": len(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}}
    gd = torch.Generator(device=device).manual_seed(0)
    micro = 2 if not tiny else 2
    for mode in ("padded", "packed"):
        if mode == "padded":  # Dream's default: every row padded to max_length, micro batch of 2 rows
            batches = [collate(rows[i:i + micro], max_length=max_length, pad_id=0) for i in range(0, len(rows), micro)]
        else:  # rows packed into sequences of 2 x max_length tokens per micro batch
            packed = pack(rows, max_length=max_length, pad_id=0)
            batches = [Batch(packed.input_ids[i:i + micro], packed.maskable[i:i + micro], packed.doc_ids[i:i + micro],
                             None, packed.position_ids[i:i + micro], True) for i in range(0, packed.input_ids.shape[0], micro)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            with ctx:
                loss, _, _ = forward_loss(lm, b.to(device), cfg.diffusion, gd)
            loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[mode] = {"micro_batches": len(batches), "seconds": dt, "useful_tokens_per_s": useful / dt}
    out["speedup"] = out["packed"]["useful_tokens_per_s"] / out["padded"]["useful_tokens_per_s"]
    del model, lm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    ap.add_argument("--only", default="naive,full,full-ac2,full-compile,lora,packing")
    ap.add_argument("--shapes", default="2x2048,1x8192")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    shape = TINY if a.tiny else DREAM7B
    shapes = [(1, 64), (2, 32)] if a.tiny else [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    only = a.only.split(",")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(f"# {results['device']}, torch {torch.__version__}", flush=True)
    for B, L in shapes:
        for name in [v for v in only if v != "packing"]:
            if name != "naive" and name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; choose from naive, packing, {', '.join(VARIANTS)}")
            if (B, L) == (1, 8192) and name in ("naive", "full-compile") and not a.tiny:
                continue  # the 8k shape is measured for dreamtune's paths only, to keep the call short
            t0 = time.time()
            r = run_variant(name, shape, B, L, device, a.warmup, a.iters)
            r["wall_s"] = time.time() - t0
            results["runs"].append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "times"}), flush=True)
    if "packing" in only:
        results["packing"] = run_packing(shape, device, 64 if a.tiny else 2048, 8 if a.tiny else 16, 2 if a.tiny else 4, a.tiny)
        print(json.dumps(results["packing"]), flush=True)
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':<18}{'shape':<9}{'step s':>8}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}  peak after fwd/bwd/opt  s at")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['variant']:<18}{r['shape']:<9}{'OOM':>8}{'':>10}{'':>7}{r['peak_gib']:>10.1f}")
        else:
            ph = r.get("peak_by_phase_gib", {})
            tp = r.get("time_by_phase_s", {})
            phases = ("/".join(str(ph.get(k, "-")) for k in ("forward", "backward", "optimizer")) + "  "
                      + "/".join(str(tp.get(k, "-")) for k in ("forward", "backward", "optimizer")))
            print(f"{r['variant']:<18}{r['shape']:<9}{r['step_s']:>8.3f}{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}"
                  f"{r['peak_gib']:>10.1f}  {phases}")
    if "packing" in results:
        p = results["packing"]
        print(f"packing: padded {p['padded']['useful_tokens_per_s']:,.0f} vs packed {p['packed']['useful_tokens_per_s']:,.0f} "
              f"useful tok/s ({p['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
