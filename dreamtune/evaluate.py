"""`dreamtune eval`: generate answers to math benchmarks, grade them, write per-sample JSONL and a summary.

    dreamtune eval --model DIR --tasks gsm8k,math500,aime24,aime25,amc23 --data-dir data/eval \
        --prompt-format chat --max-new-tokens 256 --alg entropy --temperature 0.2 --out results/eval_results.json
    torchrun --nproc-per-node 8 -m dreamtune.cli eval ...      # one shard of the problems per GPU

Benchmark files: --data-dir DIR (DIR/<task>/test.jsonl), else $DREAMTUNE_EVAL_DATA, else ./data/eval when it
exists, else the Hugging Face Hub (`dreamtune.tasks.resolve_data_dir`; `dreamtune compare` finds them alike).

Writes `results/eval_results.json` (summary: accuracy per task, every decoding setting, the model, the
time taken) and `results/eval_results.samples.jsonl` (one graded row per problem); docs/artifacts.md.

Resuming: while running, each rank appends its graded rows to `<stem>.samples.part-<rank>.jsonl`, a
batch at a time. Running the same command again skips every problem already in the samples file or a
part file; rows carry a `config_id` (a hash of model, prompt format, system prompt, shots, decoding
settings and seed), and a run with a different configuration refuses the same --out. At temperature > 0
a resumed run draws different numbers than an uninterrupted one would have (batches are regrouped).

Sharding: under torchrun (RANK / WORLD_SIZE), rank r takes problems r, r + W, r + 2W, ... of the full
list; after a barrier, rank 0 merges the parts into the samples file (`merge_samples`, a pure function)
and writes the summary.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dreamtune.atomic import check_writable, io_error, write_json, write_jsonl
from dreamtune.cli import positive_int
from dreamtune.engine import describe, encode_prompt, generate_batches, load_for_generation, record, render_prompt
from dreamtune.generate_cli import add_model_args, add_sampler_args, parser, sampler_from_args

DEFAULT_TASKS = "gsm8k,math500,aime24,aime25,amc23"
VERDICT_KEYS = ("extracted", "correct", "stage", "how", "error")


# ------------------------------------------------------------------------------------- files


def samples_path(out: Path) -> Path:
    """results/eval_results.json -> results/eval_results.samples.jsonl"""
    return out.with_name(f"{out.stem}.samples.jsonl")


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.samples.part-{rank}.jsonl")


def part_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.samples.part-*.jsonl"))


def read_samples(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").removesuffix("\n").split("\n")  # not splitlines: responses may hold U+2028
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n} is not valid JSON; the file is damaged, delete it (or fix that line) and rerun") from None
    return rows


def repair_tail(path: Path) -> None:
    """Cut a torn last line so that appending starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append and flush to disk: a killed run keeps every finished batch. A full disk is an OSError naming the
    file (a rerun resumes from what it holds: a torn last line is cut by repair_tail)."""
    try:
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise (io_error(e, path) or e) from None


# ------------------------------------------------------------------------------------- pure logic


def config_id(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def check_config(rows: list[dict], cid: str, where: str) -> None:
    others = sorted({r.get("config_id") for r in rows} - {cid}, key=str)
    if others:
        raise ValueError(
            f"{where} holds results of a different configuration (config_id {others[0]}, this run {cid}: model, "
            f"prompt format, system prompt, shots, decoding or seed differ); rerun with those settings to resume, "
            f"or pass another --out"
        )


def shard(items: list, rank: int, world: int) -> list:
    """Rank r of W takes items r, r + W, r + 2W, ..."""
    return items[rank::world]


def merge_samples(row_lists: list[list[dict]], order: list[tuple[str, str]]) -> list[dict]:
    """One row per (task, id) from the existing samples file and the ranks' parts: the requested problems
    first, in `order`, then rows of problems this run did not ask for (kept: an earlier, larger run's
    work is never thrown away). The first row seen for a problem wins."""
    by_key: dict[tuple[str, str], dict] = {}
    for rows in row_lists:
        for row in rows:
            by_key.setdefault((row["task"], str(row["id"])), row)
    wanted = set(order)
    merged = [by_key[k] for k in order if k in by_key]
    merged += [row for k, row in by_key.items() if k not in wanted]
    return merged


def summarize_tasks(rows: list[dict], order: list[tuple[str, str]], task_names: list[str]) -> dict:
    """{task: grading.summarize(...) + mean answer length} over the requested problems only."""
    from dreamtune.grading import summarize

    wanted = set(order)
    out = {}
    for task in task_names:
        mine = [r for r in rows if r["task"] == task and (r["task"], str(r["id"])) in wanted]
        s = summarize(mine)
        s["mean_answer_tokens"] = round(sum(r.get("answer_tokens", 0) for r in mine) / len(mine), 1) if mine else 0.0
        out[task] = s
    return out


# ------------------------------------------------------------------------------------- running


def build_problems(args) -> tuple[list[dict], dict]:
    """All requested problems, in task order, each with its prompt (messages or text); and the shots used."""
    from dreamtune import tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; give a comma-separated list such as gsm8k,math500")
    for name in names:
        if name not in tasks.TASKS:
            raise ValueError(f"unknown task '{name}'; choose from: {', '.join(tasks.TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks names a task twice: {args.tasks}")
    problems = []
    for name in names:
        shots = None
        if args.prompt_format == "fewshot":
            shots = tasks.fewshot_examples(name, k=args.shots, data_dir=args.data_dir, seed=args.seed)
        for row in tasks.load(name, data_dir=args.data_dir, limit=args.limit):
            prompt = tasks.build_prompt(row, args.prompt_format, task=name, system_prompt=args.system_prompt or None,
                                        shots=shots)
            problems.append({"task": name, "id": str(row["id"]), "question": row["question"],
                             "answer": row["answer"], "input": prompt})
    return problems, names


def rank_world() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}; launch with torchrun")
    return rank, world


def barrier(world: int) -> None:
    """All ranks wait here; gloo (CPU) is enough for a barrier, and a long timeout covers uneven shards."""
    if world == 1:
        return
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    dist.barrier()
    if mine:
        dist.destroy_process_group()


def run_shard(args, problems, sampler, cid, out, rank) -> None:
    """Generate and grade this rank's remaining problems, appending each finished batch to its part file."""
    from tqdm import tqdm

    from dreamtune import grading, tasks

    lm = load_for_generation(args.model, args.device, args.dtype, args.compile)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(out, rank)
    repair_tail(part)
    bar = tqdm(total=len(problems), desc=f"eval rank {rank}" if args.world > 1 else "eval", unit="problem",
               file=sys.stderr, disable=rank != 0, dynamic_ncols=True)
    try:  # closed on an error too, so that the error line does not land on the bar's line
        for name in dict.fromkeys(p["task"] for p in problems):  # one task at a time: one grading style
            mine = [p for p in problems if p["task"] == name]
            encoded = [encode_prompt(lm.tokenizer, p["input"]) for p in mine]

            def on_batch(idx, results, mine=mine, name=name):
                rows = []
                for i, r in zip(idx, results):
                    p = mine[i]
                    response = tasks.truncate_response(r["response"], args.prompt_format)
                    rows.append({"task": name, "id": p["id"], "question": p["question"],
                                 "prompt": render_prompt(lm.tokenizer, p["input"]),
                                 "response": response, "answer": p["answer"], "answer_tokens": r["answer_tokens"],
                                 "nfe": r["nfe"], "time_s": round(r["time_s"] / len(idx), 4), "config_id": cid})
                verdicts = grading.grade_many(rows, name, workers=args.grade_workers, timeout=args.grade_timeout)
                for row, v in zip(rows, verdicts):
                    row.update({k: v[k] for k in VERDICT_KEYS})
                append_rows(part, rows)
                bar.update(len(rows))
                bar.set_postfix_str(f"{name} {sum(r['correct'] for r in rows)}/{len(rows)} correct")

            generate_batches(lm, encoded, sampler, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                             keys=[f"{p['task']}/{p['id']}" for p in mine], on_batch=on_batch)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    from dreamtune import tasks

    ap = parser("dreamtune eval", "Evaluate a diffusion LM on math benchmarks (generate, grade, summarise).")
    ap.add_argument("--model", required=True, help="model directory (or hub id)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated: %(default)s (gpqa from a file via --data-dir)")
    tasks.add_benchmark_args(ap)
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each task")
    ap.add_argument("--system-prompt", default=tasks.DEFAULT_SYSTEM_PROMPT,
                    help="chat system turn (default: dreamtune's training default; '' for none)")
    ap.add_argument("--shots", type=int, default=None, help="fewshot exemplars (default per task: GSM8K 8, MATH/AIME/AMC 4)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="problems per generation batch (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("results/eval_results.json"), help="summary JSON (default %(default)s)")
    ap.add_argument("--grade-workers", type=int, default=None, help="math-verify processes (0 = inline)")
    ap.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per math-verify comparison")
    add_sampler_args(ap)
    add_model_args(ap)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.out.suffix != ".json":
        raise ValueError(f"--out must name a .json file (the samples go beside it), got {args.out}")
    check_writable(args.out)
    sampler = sampler_from_args(args)
    args.data_dir, data_from = tasks.resolve_data_dir(args.data_dir)
    rank, world = rank_world()
    args.world = world
    model_path = Path(args.model).expanduser()
    if not model_path.is_dir() and (str(args.model).startswith((".", "/", "~")) or model_path.exists()):
        raise FileNotFoundError(f"model directory '{args.model}' does not exist; pass the directory holding config.json")
    model_ref = str(model_path.resolve()) if model_path.is_dir() else str(args.model)
    config = {"model": model_ref, "prompt_format": args.prompt_format,
              "system_prompt": (args.system_prompt or None) if args.prompt_format == "chat" else None,
              "shots": args.shots if args.prompt_format == "fewshot" else None, "decoding": record(sampler, args.max_new_tokens),
              "seed": args.seed}
    cid = config_id(config)

    problems, names = build_problems(args)
    order = [(p["task"], p["id"]) for p in problems]
    final = samples_path(args.out)
    existing = read_samples(final)
    check_config(existing, cid, str(final))
    parts = {p: read_samples(p) for p in part_paths(args.out)}
    for p, rows in parts.items():
        check_config(rows, cid, str(p))
    done = {(r["task"], str(r["id"])) for rows in [existing, *parts.values()] for r in rows}
    todo = [p for p in shard(problems, rank, world) if (p["task"], p["id"]) not in done]
    if rank == 0 and data_from != "--data-dir":  # found by itself: say where
        print(f"benchmark files: {args.data_dir or 'the Hugging Face Hub'}"
              + (f" (from {data_from})" if args.data_dir else ""), file=sys.stderr)
    if rank == 0 and done:
        print(f"resuming: {len(done & set(order))} of {len(order)} problems already graded in {args.out.parent}",
              file=sys.stderr)
    if todo:
        run_shard(args, todo, sampler, cid, args.out, rank)
    barrier(world)
    if rank != 0:
        return 0

    paths = part_paths(args.out)
    merged = merge_samples([existing, *[read_samples(p) for p in paths]], order)
    missing = len(set(order) - {(r["task"], str(r["id"])) for r in merged})
    assert missing == 0, f"{missing} problems have no graded row after the merge"
    write_jsonl(final, merged)
    for p in paths:
        p.unlink()
    summary = {
        "model": model_ref,
        "tasks": summarize_tasks(merged, order, names),
        "decoding": config["decoding"],
        "prompt_format": args.prompt_format,
        "system_prompt": config["system_prompt"],
        "shots": config["shots"],
        "seed": args.seed,
        "limit": args.limit,
        "data_dir": args.data_dir,
        "batch_size": args.batch_size,
        "world_size": world,
        "config_id": cid,
        "time_s": round(time.perf_counter() - t0, 2),
        "generation_time_s": round(sum(r.get("time_s", 0.0) for r in merged if (r["task"], str(r["id"])) in set(order)), 2),
        "samples": final.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(args.out, summary)
    width = max(len(n) for n in names)
    for name, s in summary["tasks"].items():
        print(f"{name:<{width}}  {100 * s['accuracy']:5.1f}%  ({s['correct']}/{s['total']})")
    print(f"decoding: {describe(sampler, args.max_new_tokens)}")
    print(f"summary: {args.out}\nsamples: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
