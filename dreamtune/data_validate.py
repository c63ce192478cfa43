"""`dreamtune data validate`: token lengths of a dataset as training renders it, and what truncation does.

`validate` renders each row exactly as training does (`dreamtune.data.encode_batches`: the chat
template with the generation prompt, then response + eos) and reports, for a maximum length:
token-length statistics of prompt, response and total; the rows over the length; the rows whose
final answer right truncation would cut; and what each truncation policy would do:
  error  the run stops at the first over-long row;
  left   keeps the last max_length tokens, so the prompt's start (system turn, question) goes first;
  right  keeps the first max_length tokens, so the response's end (final answer, eos) goes first;
  drop   leaves over-long rows out.

The final answer of a response is its last marker, whichever starts last: `\\boxed{...}` (up to the
matching brace), a `####` line (to the line's end), or `Answer:` (to the end of the response). Right
truncation loses it when the token holding its LAST character sits at position >= max_length (prompt
tokens counted), i.e. when any part of the answer is cut, not only when the marker itself is.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from dreamtune.rows import check_columns
from dreamtune.validation_files import choose_report_path, default_report_path, report_settings  # noqa: F401

ANSWER_RULE = ("the last \\boxed{...}, '####' line or 'Answer:' text of the response; lost under right "
               "truncation when the token holding its last character is at position >= max_length")


# ---------------------------------------------------------------------------------------------------
# The final answer and token positions

_MARKER = re.compile(r"\\boxed\s*\{|####|Answer:")


def answer_span(response: str) -> tuple[int, int] | None:
    """(start, end) characters of the response's final answer (see the module doc), or None."""
    last = None
    for last in _MARKER.finditer(response):
        pass
    if last is None:
        return None
    start, marker = last.start(), last.group()
    end = len(response)
    if marker.startswith("\\boxed"):
        depth = 0
        for k in range(last.end() - 1, len(response)):
            depth += {"{": 1, "}": -1}.get(response[k], 0)
            if depth == 0:
                end = k + 1
                break
    elif marker == "####":
        newline = response.find("\n", start)
        end = len(response) if newline < 0 else newline
    end = start + len(response[start:end].rstrip())
    assert end > start
    return start, end


def _char_to_token(tokenizer, encoding, row: int, text: str, char: int) -> int:
    """Index of the token holding text[char] in row `row` of a batch encoding."""
    if not getattr(encoding, "encodings", None):  # a slow tokenizer: count the tokens of the prefix
        return len(tokenizer(text[:char + 1], add_special_tokens=False).input_ids) - 1
    token = encoding.char_to_token(row, char)
    while token is None and char > 0:  # a character no token claims (trimmed offsets): look left
        char -= 1
        token = encoding.char_to_token(row, char)
    return token or 0


def length_stats(x) -> dict:
    import numpy as np

    x = np.asarray(x)
    return {"min": int(x.min()), "median": float(np.median(x)), "mean": float(x.mean()),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)), "max": int(x.max())}


# ---------------------------------------------------------------------------------------------------
# The command


def _load_splits(data: str) -> dict[str, list[dict]]:
    """{split name: rows}: a prepared DIR's train and val, or one file/directory as a whole."""
    from dreamtune.data import read_rows

    path = Path(data).expanduser()
    named = {s: path / f"{s}.parquet" for s in ("train", "val")}
    if path.is_dir() and any(f.exists() for f in named.values()):
        return {s: read_rows(f) for s, f in named.items() if f.exists()}
    return {path.stem if path.is_file() else "all": read_rows(path)}


def validate(data: str, tokenizer, max_length: int, out: str | None = None,
             prompt_key: str = "prompt", response_key: str = "response") -> dict:
    """Validate `data` against a tokenizer (name or object) and max_length; write the JSON report and
    the histogram PNG (see `choose_report_path` for where); return the report (its `notice` says when
    the default file was left alone or an --out file replaced)."""
    import numpy as np

    from dreamtune.data import encode_batches

    if max_length < 1:
        raise ValueError(f"--max-length must be a positive number of tokens, got {max_length}")
    splits = _load_splits(data)
    for name, rows in splits.items():
        try:
            check_columns(rows, prompt_key, response_key)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    tokenizer_name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "")
    settings = report_settings(data, tokenizer_name, max_length, prompt_key, response_key)
    out_path, notice = choose_report_path(data, out, settings)
    from dreamtune.tokenizer import tokenizer_from

    tok = tokenizer_from(tokenizer) if isinstance(tokenizer, str) else tokenizer

    split_of = np.array([name for name, rows in splits.items() for _ in rows])
    index_in_split = [i for rows in splits.values() for i in range(len(rows))]
    prompts = [r[prompt_key] for rows in splits.values() for r in rows]
    responses = [r[response_key] for rows in splits.values() for r in rows]
    n = len(prompts)
    prompt_len, response_len = np.zeros(n, np.int64), np.zeros(n, np.int64)
    answer_end = np.full(n, -1, np.int64)  # token index (within the response) of the answer's last char
    for start, p, r in encode_batches(tok, prompts, responses):
        for j, (a, b) in enumerate(zip(p.input_ids, r.input_ids)):
            i = start + j
            prompt_len[i], response_len[i] = len(a), len(b) + 1  # + eos
            span = answer_span(responses[i])
            if span is not None:
                answer_end[i] = _char_to_token(tok, r, j, responses[i], span[1] - 1)

    total = prompt_len + response_len
    over = total > max_length
    lost = (answer_end >= 0) & (prompt_len + answer_end >= max_length)
    excess = np.maximum(total - max_length, 0)
    first = int(np.argmax(over)) if over.any() else None
    report = {
        "data": str(data),
        "tokenizer": settings["tokenizer"],  # a local directory as an absolute path
        "max_length": max_length,
        "rows": n,
        "splits": {name: {"rows": len(rows), "over_max_length": int(over[split_of == name].sum()),
                          "answer_lost_right_truncation": int(lost[split_of == name].sum())}
                   for name, rows in splits.items()},
        "prompt": length_stats(prompt_len),
        "response": length_stats(response_len),
        "total": length_stats(total),
        "over_max_length": int(over.sum()),
        "answer_lost_right_truncation": int(lost.sum()),
        "rows_without_answer_marker": int((answer_end < 0).sum()),
        "answer_rule": ANSWER_RULE,
        "policies": {
            "error": {"run_stops": bool(over.any()), "rows_over": int(over.sum()),
                      "first_row_over": None if first is None else {"split": str(split_of[first]),
                                                                    "row": index_in_split[first]}},
            "left": {"rows_truncated": int(over.sum()), "tokens_cut": int(excess.sum()),
                     "prompt_tokens_cut": int(np.minimum(excess, prompt_len).sum()),
                     "rows_response_cut": int((excess > prompt_len).sum())},
            "right": {"rows_truncated": int(over.sum()), "tokens_cut": int(excess.sum()),
                      "rows_losing_answer": int(lost.sum()), "rows_losing_eos": int(over.sum())},
            "drop": {"rows_kept": int((~over).sum()), "rows_dropped": int(over.sum()),
                     "tokens_kept": int(total[~over].sum())},
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "report": str(out_path),
        "histogram": None,
        "notice": notice,
    }
    _write_report(out_path, report, prompt_len, response_len, total, max_length)
    return report


def _write_report(out_path: Path, report: dict, prompt_len, response_len, total, max_length: int) -> None:
    import numpy as np

    from dreamtune.atomic import write_file, write_json

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from matplotlib.figure import Figure  # no pyplot: no backend or global state to disturb
        except ModuleNotFoundError:
            Figure = None
        if Figure is not None:
            png = out_path.with_suffix(".png")
            fig = Figure(figsize=(11, 4), layout="constrained")
            left, right = fig.subplots(1, 2)
            bins = np.histogram_bin_edges(np.concatenate([prompt_len, response_len]), bins=50)
            left.hist(prompt_len, bins=bins, label="prompt", alpha=0.6)
            left.hist(response_len, bins=bins, label="response (+eos)", alpha=0.6)
            left.set(title="prompt and response tokens", xlabel="tokens", ylabel="rows")
            left.legend()
            right.hist(total, bins=50, color="gray")
            right.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
            right.set(title=f"total tokens: {report['over_max_length']} of {report['rows']} rows over",
                      xlabel="tokens", ylabel="rows")
            right.legend()
            write_file(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
            report["histogram"] = str(png)
        write_json(out_path, report)
    except OSError as e:
        raise ValueError(f"cannot write {out_path} ({e.strerror or e}); choose another place with --out FILE") from None


def print_summary(report: dict) -> None:
    """The report as a readable table."""
    n, m = report["rows"], report["max_length"]
    pct = lambda k: f"{k} of {n} rows ({100 * k / max(n, 1):.1f}%)"  # noqa: E731
    splits = ", ".join(f"{s} {v['rows']}" for s, v in report["splits"].items())
    print(f"{report['data']}: {n} rows ({splits}), tokenizer {report['tokenizer']}, max_length {m}")
    print(f"{'tokens':<10}{'min':>8}{'median':>9}{'mean':>9}{'p90':>9}{'p99':>9}{'max':>8}")
    for key in ("prompt", "response", "total"):
        s = report[key]
        print(f"{key:<10}{s['min']:>8}{s['median']:>9.0f}{s['mean']:>9.1f}{s['p90']:>9.0f}{s['p99']:>9.0f}{s['max']:>8}")
    p = report["policies"]
    print(f"over max_length:          {pct(report['over_max_length'])}")
    print(f"answer lost (right trunc): {pct(report['answer_lost_right_truncation'])}; "
          f"{report['rows_without_answer_marker']} rows have no answer marker")
    first = p["error"]["first_row_over"]
    print("truncation policies:")
    print("  error  " + (f"the run stops at {first['split']} row {first['row']}" if first else "the run proceeds"))
    print(f"  left   {p['left']['rows_truncated']} rows cut from the start: {p['left']['prompt_tokens_cut']} prompt "
          f"tokens; {p['left']['rows_response_cut']} rows lose the whole prompt and part of the response")
    print(f"  right  {p['right']['rows_truncated']} rows cut at the end: {p['right']['rows_losing_answer']} lose "
          f"their final answer, {p['right']['rows_losing_eos']} their eos")
    print(f"  drop   {p['drop']['rows_kept']} rows kept, {p['drop']['rows_dropped']} dropped")
    wrote = [report["report"]] + ([report["histogram"]] if report["histogram"] else [])
    print("wrote " + ", ".join(wrote) + ("" if report["histogram"] else
                                        " (no histogram: pip install matplotlib)"))
    if report.get("notice"):
        print(f"note: {report['notice']}")
