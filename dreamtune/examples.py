"""Training examples: the rows of the training files rendered as the trainer reads them, the truncation policy
applied, and how many rows it cut (and how many of those lost their final answer, by `dreamtune data
validate`'s rule).

    from dreamtune.examples import load_examples
    examples, counts = load_examples(cfg.data.train_files, tokenizer, cfg)
"""

from __future__ import annotations

from pathlib import Path

from dreamtune.data import encode_batches, encode_examples, read_rows
from dreamtune.rows import check_columns


def count_rows(files) -> int | None:
    """Rows in the training files without reading them whole (parquet metadata); None if unknown."""
    total = 0
    for f in files:
        p = Path(f)
        if not p.exists():
            return None
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(p).metadata.num_rows
        else:
            total += len(read_rows(str(p)))
    return total


def load_examples(files, tokenizer, cfg):
    """Read rows, render them as training sees them, apply the truncation policy. Returns (examples, counts):
    counts = {"rows", "over_max_length", "truncated", "dropped", "answer_lost"}, the final answer found and
    judged lost as `dreamtune data validate` does (dreamtune/data_validate.py)."""
    from dreamtune.batching import truncate

    rows = read_rows(list(files))
    check_columns(rows, cfg.data.prompt_key, cfg.data.response_key)
    prompts = [r[cfg.data.prompt_key] for r in rows]
    responses = [r[cfg.data.response_key] for r in rows]
    encoded = encode_examples(tokenizer, prompts, responses)
    out, over = [], []
    for i, (p, r) in enumerate(encoded):
        ex = truncate(p, r, cfg.data.max_length, cfg.data.truncation, row=i)
        if len(p) + len(r) > cfg.data.max_length:
            over.append(i)
        if ex is not None:
            out.append(ex)
    policy, m = cfg.data.truncation, cfg.data.max_length
    lost = answers_lost(tokenizer, [prompts[i] for i in over], [responses[i] for i in over], m) if policy == "right" else 0
    counts = {"rows": len(encoded), "over_max_length": len(over), "truncated": len(over) if policy in ("left", "right") else 0,
              "dropped": len(over) if policy == "drop" else 0, "answer_lost": lost}
    return out, counts


def truncation_line(what: str, counts: dict, cfg) -> str:
    m, n, over = cfg.data.max_length, counts["rows"], counts["over_max_length"]
    if not over:
        return f"{what}: no row is longer than data.max_length={m}"
    if cfg.data.truncation == "drop":
        return f"{what}: dropped {over} of {n} rows longer than data.max_length={m}"
    if cfg.data.truncation == "left":
        return f"{what}: {over} of {n} rows are longer than data.max_length={m} and were cut at the start (data.truncation=left); their answers are kept"
    return (f"{what}: {over} of {n} rows are longer than data.max_length={m} and were cut at the end (data.truncation=right); "
            f"{counts['answer_lost']} of them lost their final answer (see `dreamtune data validate`)")


def answers_lost(tokenizer, prompts, responses, max_length: int) -> int:
    """How many rows right truncation at max_length cuts into the final answer of (data validate's rule)."""
    from dreamtune.data_validate import _char_to_token, answer_span

    lost = 0
    for start, p, r in encode_batches(tokenizer, prompts, responses):
        for j, prompt_ids in enumerate(p.input_ids):
            span = answer_span(responses[start + j])
            if span is not None and len(prompt_ids) + _char_to_token(tokenizer, r, j, responses[start + j], span[1] - 1) >= max_length:
                lost += 1
    return lost
