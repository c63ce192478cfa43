"""Benchmark: `dreamtune data prepare` + `dreamtune data validate` on s1K-1.1-sized data.

    python bench/bench_data.py [--rows 1000] [--tokens 8000] [--out FILE]

Builds 1000 rows with s1K-1.1's columns from the real s1K questions (s1k/s1k_question_solution.json of the
data directory shared/data beside the repository), with synthetic DeepSeek-style traces of about 8k tokens
(sentences of real s1K solutions between the hesitations of an R1 trace, never one repeated character),
then times each command as its own process, as a user runs it: interpreter start, imports and tokenizer
loading included. Goal: under 30 s in all on 2 CPU cores.
Prints a table and writes the figures as JSON (--out, default $OUT/bench_data.json if OUT is set,
else bench/results/bench_data.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PHRASES = ["Okay, let's see.", "Hmm, wait.", "Wait, let me check that again.", "Alternatively, maybe",
           "But hold on,", "So that means", "Let me verify this step.", "Hmm, that doesn't look right.",
           "Let me think differently.", "Therefore,", "Actually,", "So, putting it together,"]


def build_rows(n: int, tokens: int, tokenizer_dir: Path, seed: int = 0, shared: Path = SHARED) -> tuple[list[dict], float]:
    """s1K-1.1-schema rows whose deepseek trace is about `tokens` tokens; also the chars/token used. `shared`:
    the directory holding s1k/s1k_question_solution.json (the real s1K questions and solutions)."""
    problems = json.loads((Path(shared) / "s1k" / "s1k_question_solution.json").read_text())
    sentences = [s.strip() for p in problems for s in re.split(r"(?<=[.:])\s+|\n\n", p["solution"]) if len(s.strip()) > 20]
    rng = random.Random(seed)

    def trace(chars: int, question: str) -> str:
        parts, size = [f"Okay, so I need to solve this problem. {question[:300]}"], 0
        while size < chars:
            piece = f"{rng.choice(PHRASES)} {rng.choice(sentences)}" if rng.random() < 0.3 else rng.choice(sentences)
            parts.append(piece)
            size += len(piece) + 2
        return "\n\n".join(parts)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sample = [trace(20_000, problems[i]["problem"]) for i in range(20)]
    ratio = sum(map(len, sample)) / sum(len(ids) for ids in tok(sample, add_special_tokens=False, verbose=False).input_ids)
    rows = []
    for i in range(n):
        p = problems[i % len(problems)]
        answer = f"{p['solution'][-400:]}\n\nThe final answer is $\\boxed{{{i}}}$"
        rows.append({
            "question": p["problem"], "solution": p["solution"], "cot_type": "math",
            "source_type": "AI-MO/NuminaMath-CoT/aops_forum", "metadata": json.dumps({"row": i}),
            "gemini_thinking_trajectory": trace(int(tokens * ratio / 4), p["problem"]), "gemini_attempt": answer,
            "deepseek_thinking_trajectory": trace(int(tokens * ratio), p["problem"]), "deepseek_attempt": answer,
            "gemini_grade": "Yes", "gemini_grade_reason": "", "deepseek_grade": "Yes", "deepseek_grade_reason": "",
        })
    return rows, ratio


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `python -m dreamtune.cli ARGV`. CPU time shows what other work on
    a shared machine does to the wall time (2 cores: CPU / 2 is about the wall time on an idle machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dreamtune.cli", *argv], cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:2])} failed:\n{proc.stdout}{proc.stderr}")
    return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores}-core CPU ({cpu}), {mem:.0f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=8000, help="target deepseek trace length in tokens")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT") or REPO / "bench" / "results") / "bench_data.json"))
    args = ap.parse_args()
    tokenizer = SHARED / "tokenizer-dream"
    if not tokenizer.exists():
        sys.exit(f"{SHARED} not present: this benchmark needs the s1K questions and the Dream tokenizer there")

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, ratio = build_rows(args.rows, args.tokens, tokenizer)
        src = tmp / "s1k11.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
        load = os.getloadavg()[0]
        (t_prepare, cpu_prepare) = timed(["data", "prepare", "--input", str(src), "--out", str(tmp / "prepared"), "--format", "s1k-1.1"])
        (t_validate, cpu_validate) = timed(["data", "validate", "--data", str(tmp / "prepared"), "--tokenizer", str(tokenizer),
                            "--max-length", str(args.max_length)])
        report = json.loads((tmp / "prepared" / "validation.json").read_text())
        input_mb = src.stat().st_size / 2**20

    tokens = report["total"]["mean"] * report["rows"]
    result = {
        "benchmark": "data prepare + validate", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "rows": report["rows"], "input_parquet_mb": round(input_mb, 1), "chars_per_token": round(ratio, 2),
        "response_tokens": report["response"], "max_length": args.max_length,
        "over_max_length": report["over_max_length"], "answer_lost_right_truncation": report["answer_lost_right_truncation"],
        "prepare_s": round(t_prepare, 2), "validate_s": round(t_validate, 2), "total_s": round(t_prepare + t_validate, 2),
        "validate_tokens_per_s": round(tokens / t_validate), "goal_s": 30,
        "cpu_s": {"prepare": round(cpu_prepare, 2), "validate": round(cpu_validate, 2)},
        "load_average_1min_at_start": round(load, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    r = result["response_tokens"]
    print(f"machine: {result['machine']}")
    print(f"{result['rows']} rows, input {result['input_parquet_mb']} MB parquet, response tokens "
          f"mean {r['mean']:.0f} (min {r['min']}, max {r['max']}), {tokens / 1e6:.1f}M tokens in all")
    print(f"load average at start: {load:.2f} (other work on the machine slows the wall time)")
    print(f"{'step':<28}{'wall s':>8}{'CPU s':>8}")
    print(f"{'dreamtune data prepare':<28}{t_prepare:>8.2f}{cpu_prepare:>8.2f}")
    print(f"{'dreamtune data validate':<28}{t_validate:>8.2f}{cpu_validate:>8.2f}   "
          f"({result['validate_tokens_per_s'] / 1e6:.2f}M tokens/s)")
    print(f"{'total (goal < 30 s)':<28}{t_prepare + t_validate:>8.2f}{cpu_prepare + cpu_validate:>8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
