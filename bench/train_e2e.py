"""End-to-end training benchmark: the real `dreamtune train` CLI on a random Dream-7B checkpoint in Dream format.

    python bench/train_e2e.py --out DIR                       # one H200: every kind that fits --budget-s (540)
    python bench/train_e2e.py --out DIR --only gsm8k,gsm8k-tokens,full
    python bench/train_e2e.py --tiny --out DIR                # a CPU check of the same code paths (< 1 minute)

It builds, once (kept in --work between calls), a random model of Dream-v0-Base-7B's shape (Qwen2: hidden
3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064, rope_theta 1e6; 7.6B parameters)
saved with dreamtune.models.save_dream in bf16, with the Dream tokenizer of the data directory --shared DIR
(DIR/tokenizer-dream) copied in, and two datasets: s1K-like rows (the real s1K questions of
DIR/s1k/s1k_question_solution.json with long synthetic traces built from sentences of the real solutions,
about --trace-tokens tokens, so that right truncation at 2048 applies) and GSM8K rows
(DIR/eval/gsm8k/train.jsonl). Without --shared, DIR is shared/data beside the repository or inside it. Each kind is one `python -m dreamtune.train` subprocess on
configs/dream7b_s1k.yaml with the one-H200 settings (optim.state_dtype=bfloat16 model.compile=true
model.enable_gradient_checkpointing=false), no validation:

  s1k           s1K-like rows, the recipe's micro-batches of one row (global batch 16); after step 10 a
                weights-only resumable save (trainer.save_optimizer=false), timed and measured
  resume        resumes that run from its checkpoint; the time to resume (the trainer's own log line) and
                to the first resumed step; stopped then, and the checkpoint deleted
  final         the size and write time of checkpoint-final's kind (bf16 HF directory, the trainer's
                writer) through `dreamtune export` of the same model; deleted
  s1k-tokens    s1K-like rows with data.micro_batch_tokens (--tokens, default 4096: two rows of 2048)
  gsm8k         GSM8K rows, micro-batches of one row
  gsm8k-tokens  GSM8K rows with data.micro_batch_tokens
  gsm8k-packed  GSM8K rows packed into rows of max_length (data.packing=true data.perbatch_cutoff=false
                data.micro_batch_tokens): no padding, each row attends only to itself
  gsm8k-packed-64  the same with global batch 64 (data.train_batch_size=64): four times the tokens per
                optimizer update
  full          a run with the full resumable state (trainer.save_optimizer=true): on the 64 GiB disk the
                trainer's pre-flight refuses it (about 61 GB a checkpoint); the one line and its estimate
                are recorded

Throughput kinds and resume are stopped once their last measured step is in metrics.jsonl, before any
save, and run with trainer.check_disk=false (the pre-flight would count the save they never reach). Figures: tokens/s and MFU as the
trainer logs them in metrics.jsonl (median of steps 3-10), peak GPU memory (the trainer's peak_gib), the
trainer's own size estimates next to the bytes on disk. Disk: the base model takes 15 GB; only one 30 GB
weights-only checkpoint or one 15 GB export exists at a time (each is deleted before the next kind), so
the 64 GiB disk suffices; the 61 GB full resumable checkpoint does not fit and is not written.
--budget-s: kinds that would start after the budget are skipped (listed in the JSON); run them in a second
call with --only. Prints a table and writes DIR/train_e2e.json ($OUT when set, else bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

DREAM7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=152064, max_position_embeddings=4096, rope_theta=1e6)
KINDS = ("s1k", "resume", "final", "s1k-tokens", "gsm8k", "gsm8k-tokens", "gsm8k-packed", "gsm8k-packed-64", "full")
TINY_KINDS = ("s1k", "resume", "gsm8k-tokens", "gsm8k-packed")  # a CPU check in under a minute
ONE_H200 = ["optim.state_dtype=bfloat16", "model.compile=true", "model.enable_gradient_checkpointing=false"]


def shared_dir(arg: str | None) -> Path:
    for d in ([Path(arg)] if arg else [REPO.parent / "shared" / "data", REPO / "shared" / "data"]):
        if (d / "tokenizer-dream").is_dir() and (d / "s1k").is_dir():
            return d
    sys.exit("error: no data directory with tokenizer-dream/, s1k/ and eval/gsm8k/ found (shared/data beside or inside "
             "the repository); pass --shared DIR")


def build_model(d: Path, shape: dict, shared: Path) -> None:
    """A random Dream-format checkpoint of `shape` (bf16) with the Dream tokenizer; kept if already there."""
    import torch

    from dreamtune.export import save_dream
    from dreamtune.models import new_model
    from dreamtune.tokenizer import load_tokenizer
    from transformers import Qwen2Config

    marker = d / "bench_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return
    shutil.rmtree(d, ignore_errors=True)
    tok = load_tokenizer(shared / "tokenizer-dream")
    cfg = Qwen2Config(**shape, tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random initialisation of 7.6B parameters is minutes on a CPU, seconds on a GPU
        lm = new_model(cfg, tokenizer=tok, dtype=torch.bfloat16)
    save_dream(lm, d, dtype=torch.bfloat16)
    for f in (shared / "tokenizer-dream").iterdir():  # the tokenizer's own files, beside what save_pretrained wrote
        if not (d / f.name).exists():
            shutil.copy(f, d / f.name)
    marker.write_text(json.dumps(shape))
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()


def build_data(work: Path, shared: Path, rows: int, trace_tokens: int) -> dict:
    from bench_data import build_rows  # real s1K questions, synthetic traces from sentences of real solutions

    import pyarrow as pa
    import pyarrow.parquet as pq

    def write_parquet(rows, path):
        pq.write_table(pa.Table.from_pylist(rows), path)

    out = {}
    s1k = work / "s1k_like.parquet"
    if not s1k.exists():
        made, _ = build_rows(rows, trace_tokens, shared / "tokenizer-dream", shared=shared)
        write_parquet([{"prompt": r["question"], "response": f"{r['deepseek_thinking_trajectory']}\n\n{r['deepseek_attempt']}"}
                       for r in made], s1k)
    out["s1k"] = s1k
    gsm = work / "gsm8k.parquet"
    if not gsm.exists():
        lines = (shared / "eval" / "gsm8k" / "train.jsonl").read_text().splitlines()[: max(rows, 16)]
        write_parquet([{"prompt": r["question"], "response": r["answer"]} for r in map(json.loads, lines)], gsm)
    out["gsm8k"] = gsm
    return out


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written when the run was stopped
            continue
        if "loss" in r:
            rows[r["step"]] = r
    return [rows[s] for s in sorted(rows)]


def train(args: list[str], run: Path, timeout: float, stop_at_step: int | None) -> dict:
    """`python -m dreamtune.train ARGS`; stopped (SIGTERM) once `stop_at_step` is in metrics.jsonl."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's too
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "PYTHONPATH": path}
    t0 = time.time()
    log = open(run.parent / f"{run.name}.console.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "dreamtune.train", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    while p.poll() is None:
        if time.time() - t0 > timeout:
            p.send_signal(signal.SIGTERM)
            stopped = "timeout"
            break
        if stop_at_step is not None and any(r["step"] >= stop_at_step for r in read_metrics(run)):
            p.send_signal(signal.SIGTERM)
            stopped = "after the measured steps"
            break
        time.sleep(0.5)
    code = p.wait()
    log.close()
    text = (run.parent / f"{run.name}.console.log").read_text()
    return {"returncode": code, "stopped": stopped, "wall_s": round(time.time() - t0, 1),
            "last_line": text.strip().splitlines()[-1] if text.strip() else "", "console": text}


def figures(run: Path, first: int, last: int) -> dict:
    m = [r for r in read_metrics(run) if first <= r["step"] <= last]
    out = {"steps": [r["step"] for r in m], "tokens_per_s": median([r["tokens_per_s"] for r in m]),
           "mfu": median([r.get("mfu") for r in m]), "step_tokens": median([r["tokens"] for r in m]),
           "peak_gib": max((r.get("peak_gib", 0) for r in m), default=None) or None}
    return out


def estimates(run: Path) -> dict:
    """The trainer's own pre-flight sizes, from its log line (bytes)."""
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    m = re.search(r"checkpoints: resumable ([\d.]+ [KMG]?B) \(weights only ([\d.]+ [KMG]?B)\), checkpoint-final ([\d.]+ [KMG]?B)", log)
    if not m:
        return {}
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    val = lambda s: float(s.split()[0]) * scale[s.split()[1]]  # noqa: E731
    return {"resumable": val(m[1]), "weights": val(m[2]), "final": val(m[3])}


def log_seconds(run: Path, pattern: str) -> float | None:
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    found = re.findall(pattern, log)
    return float(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, few steps (a check of the code paths)")
    ap.add_argument("--only", default=None, help=f"comma-separated kinds, in order (of {', '.join(KINDS)}; "
                    f"default all, with --tiny {','.join(TINY_KINDS)})")
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results")))
    ap.add_argument("--work", default=str(REPO / "runs" / "train_e2e"), help="model, data and runs (kept between calls)")
    ap.add_argument("--shared", default=None, help="data directory holding tokenizer-dream/, s1k/ and eval/gsm8k/ (default: shared/data beside or inside the repository)")
    ap.add_argument("--budget-s", type=float, default=540, help="start no kind after this many seconds")
    ap.add_argument("--tokens", type=int, default=None, help="data.micro_batch_tokens of the *-tokens kinds (4096)")
    ap.add_argument("--rows", type=int, default=None, help="rows of each dataset (320; tiny 24)")
    ap.add_argument("--trace-tokens", type=int, default=None, help="s1K-like trace length in tokens (3000; tiny 300)")
    a = ap.parse_args()
    t_start = time.time()
    kinds = [k.strip() for k in (a.only or ",".join(TINY_KINDS if a.tiny else KINDS)).split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        sys.exit(f"error: unknown kind '{bad[0]}' (choose from {', '.join(KINDS)})")
    tiny = a.tiny
    shape = TINY if tiny else DREAM7B
    max_length, gbs = (128, 2) if tiny else (2048, 16)
    last_step = 3 if tiny else 10
    first_step = 2 if tiny else 3
    tokens = a.tokens or 2 * max_length
    rows, trace_tokens = a.rows or (16 if tiny else 320), a.trace_tokens or (200 if tiny else 3000)
    work = Path(a.work) / ("tiny" if tiny else "dream7b")
    work.mkdir(parents=True, exist_ok=True)
    shared = shared_dir(a.shared)

    t0 = time.time()
    model = work / "model"
    build_model(model, shape, shared)
    data = build_data(work, shared, rows, trace_tokens)
    setup_s = round(time.time() - t0, 1)

    common = [str(REPO / "configs" / "dream7b_s1k.yaml"), f"model.partial_pretrain={model}", "data.val_files=[]",
              f"data.max_length={max_length}", f"data.train_batch_size={gbs}", "trainer.logger=[console]",
              "trainer.log_steps=1", "trainer.total_training_steps=1000", "trainer.save_checkpoint_steps=100000",
              "trainer.keep_last=1", *([] if tiny else ONE_H200), *(["trainer.device=cpu"] if tiny else [])]
    results, skipped = {}, []
    from dreamtune.disk import dir_bytes

    for kind in kinds:
        left = a.budget_s - (time.time() - t_start)
        if left < (20 if tiny else 90):
            skipped.append(kind)
            continue
        run = work / f"run-{kind}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if kind in ("s1k", "s1k-tokens", "gsm8k", "gsm8k-tokens", "gsm8k-packed", "gsm8k-packed-64", "full"):
            shutil.rmtree(run, ignore_errors=True)
            rows_file = data["gsm8k" if kind.startswith("gsm8k") else "s1k"]
            extra = [f"data.train_files=[{rows_file}]", f"trainer.default_local_dir={run}"]
            if kind.endswith("-tokens") or "-packed" in kind:
                extra.append(f"data.micro_batch_tokens={tokens}")
            if "-packed" in kind:
                extra += ["data.packing=true", "data.perbatch_cutoff=false"]
            if kind == "gsm8k-packed-64":
                extra.append(f"data.train_batch_size={4 * gbs}")
            if kind == "s1k":  # the save is measured: stop after the last measured step, weights only
                extra += [f"trainer.max_steps_this_run={last_step}", "trainer.save_optimizer=false"]
            elif kind == "full":  # the full resumable state, kept twice (keep_last 2): the pre-flight decides
                extra += [f"trainer.max_steps_this_run={last_step}", "trainer.keep_last=2", "trainer.save_checkpoint_steps=1"]
            else:  # stopped by the bench once the measured steps are logged, before any save: no disk check
                extra += ["trainer.check_disk=false"]
            stop = None if kind in ("s1k", "full") else last_step
            r = train(common + extra, run, left, stop)
            res = {"returncode": r["returncode"], "stopped": r["stopped"], "wall_s": r["wall_s"],
                   **figures(run, first_step, last_step), "estimate": estimates(run)}
            if kind == "s1k":
                ckpt = run / f"checkpoint-{last_step}"
                res["save_s"] = log_seconds(run, rf"saved \S*checkpoint-{last_step} \([^)]*\) in ([\d.]+)s")
                res["weights_checkpoint_bytes"] = dir_bytes(ckpt) if ckpt.exists() else None
            if kind == "full":
                res["preflight"] = r["last_line"] if r["returncode"] else "accepted"
                shutil.rmtree(run, ignore_errors=True)  # whatever it wrote
            elif kind != "s1k" or "resume" not in kinds:
                shutil.rmtree(run, ignore_errors=True)  # one big directory on the disk at a time
        elif kind == "resume":
            src = work / "run-s1k"
            if not (src / f"checkpoint-{last_step}").exists():
                skipped.append("resume (no s1k checkpoint: run the s1k kind first)")
                continue
            # stopped after the first resumed step, before any save: the disk holds one 30 GB checkpoint, not two
            extra = [f"data.train_files=[{data['s1k']}]", f"trainer.default_local_dir={src}", "trainer.resume_training=true",
                     "trainer.save_optimizer=false", "trainer.check_disk=false"]
            r = train(common + extra, src, left, last_step + 1)
            m = {x["step"]: x for x in read_metrics(src)}
            res = {"returncode": r["returncode"], "stopped": r["stopped"], "wall_s": r["wall_s"],
                   "resume_load_s": log_seconds(src, r"resumed from \S+ at step \d+ in ([\d.]+)s"),
                   "first_resumed_step_logged": last_step + 1 in m}
            shutil.rmtree(src, ignore_errors=True)  # 30 GB back for the next kind
        else:  # final: checkpoint-final's writer, through `dreamtune export` of the same model
            out = work / "final-export"
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            p = subprocess.run([sys.executable, "-m", "dreamtune.cli", "export", str(model), "--out", str(out)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)}, capture_output=True, text=True, timeout=left)
            res = {"returncode": p.returncode, "wall_s": round(time.time() - t, 1),
                   "final_bytes": dir_bytes(out) if out.exists() else None, "last_line": (p.stderr or p.stdout).strip()[-300:]}
            shutil.rmtree(out, ignore_errors=True)
        res["peak_rss_gib"] = round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20, 2)
        results[kind] = res

    from dreamtune.disk import format_bytes

    print(f"{'kind':<14}{'tok/s':>10}{'MFU':>8}{'peak GiB':>10}{'wall s':>8}  notes")
    for kind, r in results.items():
        notes = []
        if r.get("save_s") is not None:
            notes.append(f"weights-only save {r['save_s']}s, {format_bytes(r['weights_checkpoint_bytes'])} "
                         f"(estimate {format_bytes(r['estimate'].get('weights'))})")
        if "resume_load_s" in r:
            notes.append(f"resume {r['resume_load_s']}s")
        if "final_bytes" in r:
            notes.append(f"checkpoint-final kind {format_bytes(r['final_bytes'])} in {r['wall_s']}s")
        if "preflight" in r:
            notes.append(f"pre-flight: {r['preflight'][:160]}")
        if r.get("returncode") not in (0, None) and not r.get("stopped") and "preflight" not in r:
            notes.append(f"exit {r['returncode']}")
        tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"{kind:<14}{tok:>10}{mfu:>8}{peak:>10}{r.get('wall_s', 0):>8}  {'; '.join(notes)}")
    if skipped:
        print(f"skipped (budget or order): {', '.join(skipped)}")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"bench": "train_e2e", "tiny": tiny, "device": device, "shape": shape, "max_length": max_length,
              "global_batch": gbs, "median_of_steps": [first_step, last_step], "micro_batch_tokens": tokens,
              "settings": [] if tiny else ONE_H200, "setup_s": setup_s, "results": results, "skipped": skipped,
              "total_s": round(time.time() - t_start, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("train_e2e_tiny.json" if tiny else "train_e2e.json")).write_text(json.dumps(report, indent=2))
    print(f"wrote {out / ('train_e2e_tiny.json' if tiny else 'train_e2e.json')}")


if __name__ == "__main__":
    main()
