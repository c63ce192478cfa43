"""LLaDA-8B on one GPU: the training step (full fine-tune and LoRA r16) and LLaDA's sampler vs the fast sampler.

    python bench/llada.py --out bench/results/llada.json --budget-s 420     # one H200, under 9 minutes
    python bench/llada.py --tiny --out /tmp/llada.json                       # CPU smoke run, seconds

The model: LLaDA-8B's config.json keys (d_model 4096, 32 layers, 32 heads = kv heads, mlp 12288, vocab
126464, rope_theta 5e5) read by dreamtune.llada.llama_config, as `dreamtune.load` reads a LLaDA download,
into transformers' Llama with bidirectional attention; random weights made on the device (bench/train_step.py's
materialise: no 16 GB of shards written and read back); shift False, mask id 126336.

- train: bench/train_step.py's step with diffusion.objective=llada (LLaDA's SFT loss), 2 x 2048 tokens:
    full   optim.state_dtype=bfloat16 moments, compiled layers, no recompute (train_step's full-lean-noac);
    lora   LoRA r16 on all linear layers, bf16 frozen base, compiled, checkpointing, bf16 moments, input
           embeddings in CPU memory (train_step's lora-offload: configs/llada8b_s1k_lora.yaml's settings).
  Median step time, tokens/s, MFU (6N + attention per token against 989 TFLOP/s dense bf16), peak memory.
- sample: a 100-token prompt, 256 new tokens, at batch 1 and 32, bf16:
    llada  LLaDA's sampler as d1 evaluates: low_confidence, block 32, steps 128 (2 tokens a step), greedy;
    fast   the fast sampler: threshold 0.9, block 32, dual cache;
    fast 2/step  the fast sampler at LLaDA's parallelism (2 tokens a step, dual cache): the cache's effect alone.
  Tokens/s and forward passes. Random weights give every token a probability near 1/vocab, so the
  threshold sampler reveals one position a step (256 forwards) and never stops early; a trained model's
  confidence decides its real speed-up.

Each part starts only while less than --budget-s seconds have passed; the JSON is written after every part.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import PEAK_FLOPS, flops_per_token, materialise, run_variant  # noqa: E402

from dreamtune.llada import REQUIRED, llama_config  # noqa: E402
from dreamtune.models import DiffusionLM  # noqa: E402
from dreamtune.engine import generate  # noqa: E402

MASK, EOS = 126_336, 126_081
# LLaDA-8B's config.json (the keys that shape the model), as GSAI-ML/LLaDA-8B-Base / -Instruct hold it
LLADA_8B = dict(REQUIRED, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                embedding_size=126464, vocab_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                rms_norm_eps=1e-5, weight_tying=False, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
# the smoke run keeps LLaDA's vocabulary, so its ids (mask, eos) are the real ones
TINY = dict(LLADA_8B, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=64)
TRAIN = {"full": "full-lean-noac", "lora": "lora-offload"}  # bench/train_step.py's variants


def hf_shape(cfg: dict) -> dict:
    """The train_step shape keys (flops, batch ids) of a LLaDA config."""
    return {"hidden_size": cfg["d_model"], "num_hidden_layers": cfg["n_layers"], "vocab_size": cfg["embedding_size"]}


def build_llada(cfg: dict, device, dtype=torch.float32, seed: int = 0):
    """A random LlamaForCausalLM from LLaDA's config keys (is_causal False), made on the device."""
    from transformers import LlamaForCausalLM

    lcfg = llama_config(cfg, "LLaDA-8B's config")
    lcfg._attn_implementation = "sdpa"
    model = materialise(LlamaForCausalLM, lcfg, device, dtype, seed)
    model.config.is_causal = False
    return model


def train_row(kind: str, cfg: dict, device, B: int, L: int, warmup: int, iters: int) -> dict:
    """One bench/train_step.py variant (TRAIN[kind]) on the LLaDA model, with LLaDA's SFT objective."""
    t0 = time.time()
    r = run_variant(TRAIN[kind], hf_shape(cfg), B, L, device, warmup, iters,
                    model_fn=lambda shape, device, dtype: build_llada(cfg, device, dtype),
                    shift=False, mask_id=MASK, overrides=("diffusion.objective=llada",))
    r.update(kind=kind, wall_s=round(time.time() - t0, 1))
    r.pop("times", None)
    gc.collect()  # the variant's model and optimizer went with run_variant's frame
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def sampler_settings(gen: int, block: int) -> list[tuple[str, dict]]:
    fast = dict(max_new_tokens=gen, alg="fast", block_length=block, dual_cache=True, temperature=0.0)
    return [("llada low_confidence", dict(max_new_tokens=gen, steps=gen // 2, alg="low_confidence",
                                          block_length=block, temperature=0.0)),
            ("fast threshold 0.9", dict(fast, threshold=0.9)),
            ("fast 2/step", dict(fast, tokens_per_step=2))]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_rows(lm, device, batches, prompt_len: int, gen: int, block: int, deadline: float):
    for b in batches:
        prompt = torch.randint(0, 126_000, (b, prompt_len), generator=torch.Generator().manual_seed(b)).to(device)
        generate(lm, prompt, max_new_tokens=block, steps=block // 2, alg="low_confidence", block_length=block)  # warm-up
        base = None
        for name, kw in sampler_settings(gen, block):
            if time.time() > deadline:
                yield {"part": "sample", "batch": b, "setting": name, "skipped": "past --budget-s"}
                continue
            first = None
            if kw["alg"] == "fast":  # a first run sees every shape (and captures the CUDA graphs)
                sync(device)
                t0 = time.perf_counter()
                generate(lm, prompt, generator=torch.Generator(device=device).manual_seed(0), **kw)
                sync(device)
                first = round(time.perf_counter() - t0, 3)
            sync(device)
            t0 = time.perf_counter()
            out = generate(lm, prompt, generator=torch.Generator(device=device).manual_seed(0), **kw)
            sync(device)
            dt = time.perf_counter() - t0
            tps = b * gen / dt
            base = base or tps
            yield {"part": "sample", "batch": b, "setting": name, "nfe": out.nfe, "time_s": round(dt, 3),
                   "first_call_s": first, "tokens_per_s": round(tps, 1), "vs_llada": round(tps / base, 2),
                   "kwargs": kw}


def print_table(res: dict) -> None:
    print(f"\n{'train':<6}{'variant':<16}{'shape':<9}{'step s':>8}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}")
    for r in res["train"]:
        if "error" in r or "skipped" in r:
            print(f"{r['kind']:<6}{r.get('variant', ''):<16}{r.get('shape', ''):<9}  {r.get('error') or r['skipped']}")
        else:
            print(f"{r['kind']:<6}{r['variant']:<16}{r['shape']:<9}{r['step_s']:>8.3f}{r['tokens_per_s']:>10,.0f}"
                  f"{r['mfu']:>7.1%}{r['peak_gib']:>10.1f}")
    print(f"\n{'batch':>5}  {'sampler':<22}{'nfe':>5}{'first s':>9}{'time s':>8}{'tok/s':>10}{'vs llada':>9}")
    for r in res["sample"]:
        if "skipped" in r:
            print(f"{r['batch']:>5}  {r['setting']:<22}  {r['skipped']}")
        else:
            first = "-" if r["first_call_s"] is None else f"{r['first_call_s']:.2f}"
            print(f"{r['batch']:>5}  {r['setting']:<22}{r['nfe']:>5}{first:>9}{r['time_s']:>8.2f}"
                  f"{r['tokens_per_s']:>10.1f}{r['vs_llada']:>8.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: LLaDA's vocabulary, a 2-layer d_model-32 model")
    ap.add_argument("--out", type=Path, default=Path("bench/results/llada.json"), help="the JSON written")
    ap.add_argument("--budget-s", type=float, default=420, help="start no part after this many seconds")
    ap.add_argument("--only", default="train,sample", help="train, sample or both (comma-separated)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.tiny
    if not cuda and not a.tiny:
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cfg = TINY if a.tiny else LLADA_8B
    B, L = (2, 64) if a.tiny else (2, 2048)
    gen, block, prompt_len = (32, 8, 16) if a.tiny else (256, 32, 100)
    batches = (1, 4) if a.tiny else (1, 32)
    t_start = time.time()
    deadline = t_start + a.budget_s
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "tiny": a.tiny,
           "date": time.strftime("%Y-%m-%d"), "model": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads",
           "n_kv_heads", "mlp_hidden_size", "embedding_size")}, "peak_flops": PEAK_FLOPS, "train": [], "sample": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["total_s"] = round(time.time() - t_start, 1)
        a.out.write_text(json.dumps(res, indent=2))

    print(f"# {res['device']}, torch {torch.__version__}, LLaDA shape {res['model']}", flush=True)
    if "train" in a.only:
        for kind in TRAIN:
            if time.time() > deadline:
                res["train"].append({"kind": kind, "variant": TRAIN[kind], "skipped": "past --budget-s"})
                continue
            r = train_row(kind, cfg, device, B, L, 1 if a.tiny else 2, 2 if a.tiny else 5)
            res["train"].append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            save()
    if "sample" in a.only:
        model = build_llada(cfg, device, torch.bfloat16 if cuda else torch.float32).eval()
        n = sum(p.numel() for p in model.parameters())
        res["params"], res["train_flops_per_token"] = n, flops_per_token(n, hf_shape(cfg), L)
        lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=MASK, shift=False, source="random LLaDA-8B shape")
        for r in sample_rows(lm, device, batches, prompt_len, gen, block, deadline):
            res["sample"].append(r)
            print(json.dumps(r), flush=True)
            save()
        if cuda:
            res["sample_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    save()
    print_table(res)
    print(f"total {res['total_s']} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
