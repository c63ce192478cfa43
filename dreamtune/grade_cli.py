"""`dreamtune grade`: grade generations made elsewhere (a JSONL of {response, answer[, question]}).

    dreamtune grade --task gsm8k --predictions preds.jsonl [--out preds.graded.jsonl]
"""

from __future__ import annotations

import sys
from pathlib import Path

from dreamtune.atomic import check_writable, write_jsonl
from dreamtune.data import json_lines
from dreamtune.grading import DEFAULT_TIMEOUT, TASK_NAMES, format_rules, format_summary, grade_many, summarize


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL; each needs `response` and `answer` (ValueError naming the line)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"predictions file {path} is a directory (pass a JSONL file with 'response' and 'answer' per line)")
    if not path.is_file():
        raise ValueError(f"predictions file not found: {path} (pass a JSONL file with 'response' and 'answer' per line)")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not JSONL; pass a JSONL file with 'response' and 'answer' per line") from None
    for n, row in json_lines(path, text, "a JSON object with 'response' and 'answer'"):
        for key in ("response", "answer"):
            if key not in row or row[key] is None:
                raise ValueError(
                    f"{path}:{n}: row has no '{key}' field; each row needs 'response' (the model's raw "
                    "output) and 'answer' (the reference answer)"
                )
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows; expected JSON lines with 'response' and 'answer'")
    return rows


def default_out_path(predictions: str | Path) -> Path:
    """`preds.jsonl` -> `preds.graded.jsonl`, beside the input."""
    p = Path(predictions)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return p.with_name(f"{stem}.graded.jsonl")


def main(argv: list[str] | None = None) -> int:
    from dreamtune.cli import parser

    ap = parser("dreamtune grade", "Grade generations made elsewhere: a JSONL with 'response' (raw model output) "
                "and 'answer' (reference) per line; 'question' optional.")
    ap.add_argument("--task", required=True, choices=TASK_NAMES, help="answer style (gpqa: choice letters)")
    ap.add_argument("--predictions", required=True, help="JSONL file of {response, answer[, question]}")
    ap.add_argument("--out", help="per-row verdicts JSONL (default: <predictions>.graded.jsonl beside it)")
    ap.add_argument("--workers", type=int, default=None, help="math-verify processes (0 = inline; default min(4, CPUs))")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per item for math-verify")
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 (inline) or more, got {args.workers}")
    out = Path(args.out) if args.out else default_out_path(args.predictions)
    if out.resolve() == Path(args.predictions).resolve():
        raise ValueError(f"--out {out} would overwrite the predictions file; choose another path")
    check_writable(out)
    rows = read_predictions(args.predictions)
    try:
        verdicts = grade_many(rows, args.task, workers=args.workers, timeout=args.timeout)
    except ValueError as e:  # a reference that cannot be read: say which file
        raise ValueError(f"{args.predictions}: {e}") from None
    graded = [{**row, **{k: v[k] for k in ("extracted", "correct", "stage", "how", "error")}} for row, v in zip(rows, verdicts)]
    write_jsonl(out, graded)
    print(format_summary(summarize(verdicts)))
    print(format_rules(verdicts))
    print(f"verdicts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
