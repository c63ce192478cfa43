"""Generation throughput: Dream's sampler vs the fast sampler, on a random model of Dream-7B's shape.

    python bench/generate.py                 # one GPU (an H200: about 5 minutes, bf16, sdpa)
    python bench/generate.py --tiny          # CPU smoke test: a tiny model, seconds
    OUT=/some/dir python bench/generate.py   # also writes $OUT/bench_generate.json
    python bench/generate.py --compile       # decoder layers torch.compiled (each setting compiled, then timed)

Times 256-token generation after a ~100-token prompt at batch 1 and 32:
- dream: the settings of Dream's README: alg entropy, steps = max_new_tokens = 256, temperature 0.2, top_p 0.95
  (the baseline of the "vs dream" column); also Dream's sampler at 64 steps (4 tokens per step);
- fast, threshold 0.9, block 32, prefix KV cache (Fast-dLLM's settings);
- fast at a fixed number of tokens per step, with no cache, the prefix cache and the dual cache.

The fast sampler's forwards run as CUDA graphs on a GPU (dreamtune.kv_forward), captured the second time a
shape is seen and kept with the model (fast_sampling.graph_cache): each fast row is run twice, the first time ("first s": shapes seen,
graphs captured) and then timed ("time s"); one row repeats 8/step with the dual cache without graphs.
Before the rows, one graph replay is checked against the eager forward (max abs difference printed).

A random model's confidences are nothing like a trained model's: its token probabilities are about
1/vocab, so the threshold sampler reveals one position per step (its speed-up then comes from the cache
alone) and it never produces the all-eos blocks that let a real answer stop early. The fixed
tokens-per-step rows show what the cache adds at a given parallelism; real speed-ups on GSM8K-like
prompts depend on how many positions a trained model is sure of (Fast-dLLM reports 3-5 per step).

The model is built on the meta device and materialised with `to_empty` plus a normal(0, 0.02) init on
the GPU, which takes seconds instead of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamtune.models import DiffusionLM  # noqa: E402
from dreamtune.engine import generate  # noqa: E402

DREAM_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, rope_theta=1e6)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=160, rope_theta=1e6)
MASK_ID, EOS_ID = 151666, 151643  # Dream's ids (the tiny shape uses vocab-relative ones)


def build_lm(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionLM:
    """A random, bidirectional Qwen2 of the given shape (bench/train_step.py's build), in eval mode."""
    from train_step import build

    vocab = shape["vocab_size"]
    mask_id, eos_id = (MASK_ID, EOS_ID) if vocab > MASK_ID else (vocab - 1, 0)
    model = build({"max_position_embeddings": 4096, **shape}, device, dtype=dtype, seed=seed,
                  eos_token_id=eos_id, pad_token_id=eos_id).eval()
    return DiffusionLM(model=model, tokenizer=None, mask_token_id=mask_id, shift=True, source="random")


def runs(max_new: int, block: int) -> list[tuple[str, dict]]:
    common = dict(max_new_tokens=max_new, temperature=0.2, top_p=0.95)
    fast = dict(common, alg="fast", block_length=block)
    return [
        ("dream entropy, steps=%d" % max_new, dict(common, alg="entropy", steps=max_new)),
        ("dream entropy, steps=%d" % (max_new // 4), dict(common, alg="entropy", steps=max_new // 4)),
        ("fast threshold 0.9, prefix cache", dict(fast, threshold=0.9)),
        ("fast 4/step, no cache", dict(fast, tokens_per_step=4, use_cache=False)),
        ("fast 4/step, prefix cache", dict(fast, tokens_per_step=4)),
        ("fast 4/step, dual cache", dict(fast, tokens_per_step=4, dual_cache=True)),
        ("fast 8/step, dual cache", dict(fast, tokens_per_step=8, dual_cache=True)),
        ("fast 8/step, dual cache, no graphs", dict(fast, tokens_per_step=8, dual_cache=True, cuda_graphs=False)),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32; tiny 1,4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (tiny 32)")
    ap.add_argument("--prompt-length", type=int, default=None, help="default 100 (tiny 20)")
    ap.add_argument("--block-length", type=int, default=None, help="fast sampler block (default 32; tiny 8)")
    ap.add_argument("--only", default=None, help="run only the settings whose name contains this text")
    ap.add_argument("--budget-s", type=float, default=400, help="skip the remaining runs once this much time has passed")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each decoder layer (fewer, fused kernels per forward: batch-1 steps are launch-bound)")
    args = ap.parse_args(argv)

    tiny = args.tiny
    device = torch.device("cpu") if tiny else torch.device("cuda")
    if not tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.float32 if tiny else torch.bfloat16
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if tiny else "1,32")).split(",")]
    max_new = args.max_new_tokens or (32 if tiny else 256)
    prompt_len = args.prompt_length or (20 if tiny else 100)
    block = args.block_length or (8 if tiny else 32)

    t0 = time.perf_counter()
    lm = build_lm(TINY if tiny else DREAM_7B, device, dtype)
    if args.compile:
        from dreamtune.distributed import apply_compile

        apply_compile(lm.model)  # compiled on first use: the first row of each shape includes compilation
    sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, {dtype}, built in {build_s:.1f} s on {device}", flush=True)

    out_dir = os.environ.get("OUT")
    result = {
        "bench": "generate", "tiny": tiny, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "dtype": str(dtype),
        "params": n_params, "prompt_length": prompt_len, "max_new_tokens": max_new, "block_length": block,
        "note": "random weights: the threshold sampler reveals one position per step and never stops early; "
                "fixed tokens-per-step rows show the cache's effect",
        "rows": [],
    }
    if device.type == "cuda":  # the graph path must compute what the eager one does
        from dreamtune.kv_forward import GraphCache, forward_columns

        ids = torch.randint(0, 1000, (1, prompt_len + max_new), device=device)
        pos = torch.arange(ids.shape[1], device=device)[None]
        eager = forward_columns(lm.model, ids, pos, None)
        gc = GraphCache()
        for _ in range(3):  # eager, capture + replay, replay
            graphed = gc.run(lm.model, ids, pos, None).clone()
        diff = (graphed.float() - eager.float()).abs().max().item()
        result["graph_check_max_abs_diff"] = diff
        print(f"graph check: {len(gc.graphs)} graph(s), max |graphed - eager| = {diff:.3g} "
              f"(hidden states of rms {eager.float().pow(2).mean().sqrt().item():.3g})", flush=True)
        del gc
    settings = [(n, s) for n, s in runs(max_new, block) if args.only is None or args.only in n]
    header = f"{'batch':>5}  {'setting':<34} {'nfe':>5} {'first s':>8} {'time s':>8} {'tokens/s':>10} {'vs dream':>9}"
    print(header + "\n" + "-" * len(header), flush=True)
    for b in batch_sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        prompt = torch.randint(0, min(lm.mask_token_id, 151643) - 1, (b, prompt_len), generator=gen, device=device)
        generate(lm, prompt, max_new_tokens=16, steps=2, alg="entropy")  # warm-up: kernels, allocator
        generate(lm, prompt, max_new_tokens=16, alg="fast", block_length=8, tokens_per_step=8)
        dream_tps = None
        seqs = {}
        for name, kw in settings:
            if time.perf_counter() - t0 > args.budget_s:
                print(f"{b:>5}  {name:<34} skipped: past --budget-s {args.budget_s:.0f}", flush=True)
                result["rows"].append({"batch": b, "setting": name, "skipped": "budget"})
                continue
            first = None
            if args.compile:  # compile this setting's shapes before timing it (a short run of the same canvas)
                generate(lm, prompt, generator=torch.Generator(device=device).manual_seed(1),
                         **{**kw, "steps": min(kw.get("steps") or 4, 4)} if not kw.get("alg") == "fast" else kw)
            elif kw.get("alg") == "fast":  # a first run sees every shape and captures the graphs
                sync(device)
                start = time.perf_counter()
                generate(lm, prompt, generator=torch.Generator(device=device).manual_seed(1), **kw)
                sync(device)
                first = time.perf_counter() - start
            sync(device)
            start = time.perf_counter()
            out = generate(lm, prompt, generator=torch.Generator(device=device).manual_seed(1), **kw)
            sync(device)
            dt = time.perf_counter() - start
            seqs[name] = out.sequences
            tps = b * max_new / dt
            if dream_tps is None and name.startswith("dream"):
                dream_tps = tps  # Dream's README setting (steps = max_new_tokens) is the baseline
            speedup = f"{tps / dream_tps:.1f}x" if dream_tps else "-"
            first_s = f"{first:.2f}" if first is not None else "-"
            print(f"{b:>5}  {name:<34} {out.nfe:>5} {first_s:>8} {dt:>8.2f} {tps:>10.1f} {speedup:>9}", flush=True)
            result["rows"].append({"batch": b, "setting": name, "nfe": out.nfe, "time_s": round(dt, 4),
                                   "first_call_s": None if first is None else round(first, 4),
                                   "tokens_per_s": round(tps, 2), "speedup_vs_dream": round(tps / dream_tps, 2) if dream_tps else None,
                                   "kwargs": {k: v for k, v in kw.items()}})
            if out_dir:  # after every row: a run cut short still leaves its numbers
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                (Path(out_dir) / "bench_generate.json").write_text(json.dumps(result, indent=2))
        a, e = seqs.get("fast 8/step, dual cache"), seqs.get("fast 8/step, dual cache, no graphs")
        if a is not None and e is not None:  # same kernels, same generator: graphs must not change a token
            same = bool(torch.equal(a, e))
            result.setdefault("graphed_equals_eager", {})[str(b)] = same
            print(f"batch {b}: fast 8/step dual cache, graphed tokens == eager tokens: {same}", flush=True)
    if device.type == "cuda":
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {result['total_s']} s" + (f", peak memory {result['max_memory_gb']} GiB" if "max_memory_gb" in result else ""))
    if out_dir:
        (Path(out_dir) / "bench_generate.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {Path(out_dir) / 'bench_generate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
