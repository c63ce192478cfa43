"""`dreamtune compare`: base vs tuned model, side by side, with identical decoding settings and seed.

    dreamtune compare --base Dream-org/Dream-v0-Base-7B --tuned runs/s1k/checkpoint-final \
        --task gsm8k --n 20 --data-dir data/eval --out results/compare.json
    dreamtune compare --base DIR --tuned DIR --prompts prompts.jsonl --chat --max-new-tokens 256

Prompts come from a file (JSONL rows with `prompt` or `messages` and an optional `answer`, or a text
file with one prompt per line) or from the first K problems of a benchmark, whose files are found as
`dreamtune eval` finds them (--data-dir, $DREAMTUNE_EVAL_DATA, ./data/eval, else the Hub). Both models
see the same prompts, settings and per-batch seeds; the models are loaded one after the other (one in
memory at a time), under one progress bar (with the time left) over both models' answers. Prints the
two answers side by side and writes the JSON that the report reads (docs/artifacts.md).
"""

from __future__ import annotations

import datetime
import itertools
import shutil
import sys
import textwrap
import time
from pathlib import Path

from dreamtune.atomic import check_writable, write_json
from dreamtune.cli import positive_int
from dreamtune.hub import resolve_dir
from dreamtune.models import check_weights
from dreamtune.engine import describe, encode_prompt, generate_batches, load_for_generation, record, render_prompt
from dreamtune.generate_cli import (add_model_args, add_sampler_args, parser, read_prompt_rows, read_prompts_text,
                                    sampler_from_args)


def read_prompts_file(path: Path) -> list[dict]:
    """JSONL rows ({prompt|messages, answer?}) or, for any other suffix, one prompt per non-empty line."""
    if path.suffix == ".jsonl":
        rows = read_prompt_rows(path)
        return [{"input": r.get("prompt", r.get("messages")), "answer": r.get("answer")} for r in rows]
    rows = [{"input": line, "answer": None} for line in read_prompts_text(path).splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def task_prompts(args) -> list[dict]:
    from dreamtune import tasks

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    shots = tasks.fewshot_examples(args.task, data_dir=args.data_dir, seed=args.seed) if args.prompt_format == "fewshot" else None
    rows = tasks.load(args.task, data_dir=args.data_dir, limit=args.n)
    return [{"input": tasks.build_prompt(r, args.prompt_format, task=args.task, system_prompt=(tasks.DEFAULT_SYSTEM_PROMPT if args.system is None else args.system) or None,
                                         shots=shots), "answer": r["answer"], "id": str(r["id"])} for r in rows]


def run_model(path, rows, args, sampler, chat: bool, progress: dict, name: str) -> tuple[list[str], float, list[str]]:
    """Responses of one model to every row, the seconds it took, and the rendered prompts. progress["bar"]
    (one tqdm bar over both models' answers) is made once the first model has loaded, so that a model
    that cannot be loaded is one error line, and advances a batch at a time."""
    import torch
    from tqdm import tqdm

    lm = load_for_generation(path, args.device, args.dtype, args.compile)
    system = None if args.task else (args.system or None)  # free prompts: a system turn only when asked, as generate
    encoded = [encode_prompt(lm.tokenizer, r["input"], chat, system) for r in rows]
    rendered = [render_prompt(lm.tokenizer, r["input"], chat, system) for r in rows]
    if progress.get("bar") is None:  # as eval's bar; the ETA covers the whole comparison
        progress["bar"] = tqdm(total=2 * len(rows), desc="compare", unit="answer", file=sys.stderr, dynamic_ncols=True)
    bar = progress["bar"]
    bar.set_description(f"compare {name}")
    t0 = time.perf_counter()
    results = generate_batches(lm, encoded, sampler, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                               on_batch=lambda idx, done: bar.update(len(idx)))
    dt = time.perf_counter() - t0
    responses = [r["response"] for r in results]
    if args.task:
        from dreamtune import tasks

        responses = [tasks.truncate_response(t, args.prompt_format) for t in responses]
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return responses, dt, rendered


def side_by_side(left: str, right: str, width: int) -> str:
    """Two texts in columns of `width` characters, wrapped, separated by ' | '."""
    def wrap(text):
        return [piece for line in text.splitlines() or [""] for piece in (textwrap.wrap(line, width) or [""])]

    return "\n".join(f"{a:<{width}} | {b}" for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue=""))


def main(argv: list[str] | None = None) -> int:
    from dreamtune import tasks

    ap = parser("dreamtune compare", "Base vs tuned model, side by side, same decoding settings and seed.")
    ap.add_argument("--base", required=True, help="base model directory (or hub id)")
    ap.add_argument("--tuned", required=True, help="tuned model directory")
    ap.add_argument("--prompts", type=Path, help="JSONL ({prompt|messages, answer?}) or text file, one prompt per line")
    ap.add_argument("--task", choices=list(tasks.TASKS), help="use the first --n problems of this benchmark")
    ap.add_argument("--n", type=int, default=10, help="problems with --task (default %(default)s)")
    tasks.add_benchmark_args(ap)  # with --task
    ap.add_argument("--chat", action="store_true", help="with --prompts: wrap text prompts in the chat template")
    ap.add_argument("--system", default=None, help="system turn for chat prompts (default: the benchmark prompt's "
                    "with --task, none with --prompts, as `dreamtune generate --chat`; '' for none)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generation batch (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("results/compare.json"), help="JSON for the report (default %(default)s)")
    add_sampler_args(ap)
    add_model_args(ap)
    args = ap.parse_args(argv)
    if (args.prompts is None) == (args.task is None):
        raise ValueError("give either --prompts FILE or --task NAME --n K")
    check_writable(args.out)
    for flag, path in (("--base", args.base), ("--tuned", args.tuned)):  # now, not after the base model has run
        try:
            d = resolve_dir(path, download=False)
            if d is not None:  # a local or cached model: its weights whole (a cut-short download found now too)
                check_weights(d)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise type(e)(f"{flag}: {e}") from None
    sampler = sampler_from_args(args)
    data_from = "--data-dir"
    if args.task:
        args.data_dir, data_from = tasks.resolve_data_dir(args.data_dir)
    rows = task_prompts(args) if args.task else read_prompts_file(args.prompts)
    if data_from != "--data-dir":  # found by itself: say where
        print(f"benchmark files: {args.data_dir or 'the Hugging Face Hub'}"
              + (f" (from {data_from})" if args.data_dir else ""), file=sys.stderr)
    chat = args.prompt_format == "chat" if args.task else args.chat

    progress: dict = {}
    try:
        base, base_s, rendered = run_model(args.base, rows, args, sampler, chat, progress, "base")
        tuned, tuned_s, _ = run_model(args.tuned, rows, args, sampler, chat, progress, "tuned")
    finally:
        if progress.get("bar") is not None:
            progress["bar"].close()

    graded = args.task is not None or all(r.get("answer") is not None for r in rows)
    out_rows = [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(rendered, base, tuned)]
    summary = {}
    if graded:
        from dreamtune.grading import grade_many

        task = args.task or "generic"
        for name, responses in (("base", base), ("tuned", tuned)):
            verdicts = grade_many([{"response": r, "answer": row["answer"]} for r, row in zip(responses, rows)], task)
            for out_row, v in zip(out_rows, verdicts):
                out_row[f"{name}_correct"] = v["correct"]
                out_row[f"{name}_extracted"] = v["extracted"]
            summary[f"{name}_accuracy"] = sum(v["correct"] for v in verdicts) / len(verdicts)
        for out_row, row in zip(out_rows, rows):
            out_row["answer"] = row["answer"]
            if "id" in row:
                out_row["id"] = row["id"]

    width = max(30, (shutil.get_terminal_size((160, 24)).columns - 3) // 2)
    for i, (row, r) in enumerate(zip(rows, out_rows), 1):
        print(f"=== {i}/{len(rows)} " + ("=" * 40))
        print(textwrap.shorten(r["prompt"].replace("\n", " "), 2 * width, placeholder=" ..."))
        if graded:
            print(f"reference: {row['answer']}   base: {'correct' if r['base_correct'] else 'wrong'}   "
                  f"tuned: {'correct' if r['tuned_correct'] else 'wrong'}")
        print(side_by_side("BASE", "TUNED", width))
        print(side_by_side(r["base"], r["tuned"], width))
    if graded:
        print(f"accuracy: base {100 * summary['base_accuracy']:.1f}%  tuned {100 * summary['tuned_accuracy']:.1f}%  "
              f"({len(rows)} problems)")
    print(f"decoding: {describe(sampler, args.max_new_tokens)}")
    result = {
        "base": args.base, "tuned": args.tuned, "decoding": record(sampler, args.max_new_tokens), "seed": args.seed,
        "prompt_format": args.prompt_format if args.task else ("chat" if args.chat else "raw"),
        "task": args.task, "rows": out_rows, "summary": summary,
        "time_s": {"base": round(base_s, 2), "tuned": round(tuned_s, 2)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
