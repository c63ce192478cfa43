"""`dreamtune data prepare` and `dreamtune data download`: rows of a known format -> a prepared dataset
(DIR/train.parquet, DIR/val.parquet, DIR/manifest.json; docs/artifacts.md), and hub or local data -> parquet.

Formats of `prepare --format` (the response text is exactly this):
  s1k-1.1  simplescaling/s1K-1.1. Prompt = `question`. `--trace deepseek` (default) or `gemini` takes
           `<trace>_thinking_trajectory` and `<trace>_attempt`; with answer = "Answer: " + attempt
           (unless the attempt already contains "Answer:", s1's own rule), the response is
             --layout s1 (default, s1's text): "<|im_start|>think\\n" + trajectory.strip()
                                               + "\\n<|im_start|>answer\\n" + answer.strip()
             --layout plain:                   trajectory.strip() + "\\n\\n" + answer.strip()
           `--trace none` uses the reference `solution` alone (no model trace, the shortest rows).
  s1k      the original simplescaling/s1K: `thinking_trajectories` (a list of strings, joined with
           "\\n" as s1 does) and `attempt`, both Gemini's, so --trace is gemini (default) or none.
  gsm8k    `question` -> prompt; `answer` (a worked solution ending "#### N") -> the same reasoning
           without the calculator annotations "<<48/2=24>>" (a tool the model does not have), its
           last line "#### N" rewritten as "The answer is \\boxed{N}." (what math graders extract).
  math     `problem` -> prompt, `solution` -> response, verbatim (MATH solutions end in \\boxed{}).
  generic  `--prompt-column` (default prompt; a string or a list of chat messages) and
           `--response-column` (default response), verbatim. gsm8k and math accept the two flags too.
A system message (default: "You are a helpful AI assistant. Think step by step.")
is put before the user turn unless the prompt already starts with one; `--no-system-prompt` leaves it
out (note: ChatML templates such as Dream's then insert their own default system turn).

Every output appears whole or not at all: files are written under a temporary name beside the target
and renamed into place, after every input check has passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dreamtune.atomic import io_error, temp_dir_beside, write_file
from dreamtune.hub import hub_offline_if_unreachable
from dreamtune.data import DATA_SUFFIXES, DEFAULT_SYSTEM_PROMPT, FORMATS, input_sha256, read_rows
from dreamtune.rows import require_columns, text_field, to_messages

# ---------------------------------------------------------------------------------------------------
# Converting rows of each format


def _s1_response(trajectory: str, attempt: str, layout: str) -> str:
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt  # s1's rule
    if layout == "s1":
        return "<|im_start|>think\n" + trajectory.strip() + "\n<|im_start|>answer\n" + answer.strip()
    return trajectory.strip() + "\n\n" + answer.strip()


_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def gsm8k_response(answer: str, index: int = 0) -> str:
    """A GSM8K worked solution without calculator annotations, ending "The answer is \\boxed{N}."."""
    m = _GSM8K_FINAL.search(answer)
    if m is None:
        raise ValueError(f"row {index}: a gsm8k answer must end with a '#### N' line")
    reasoning = _CALCULATOR.sub("", answer[:m.start()]).strip()
    final = f"The answer is \\boxed{{{m.group(1)}}}."
    return f"{reasoning}\n{final}" if reasoning else final


def _source_columns(fmt: str, trace: str, prompt_column, response_column) -> tuple[str, list[str]]:
    """(prompt column, response columns) that `fmt` reads."""
    if fmt in ("s1k-1.1", "s1k"):
        if response_column:
            raise ValueError(f"--response-column does not apply to --format {fmt}: its response is built from "
                             "the trace and attempt columns (choose them with --trace), or use --format generic")
        prompt = prompt_column or "question"
        if trace == "none":
            return prompt, ["solution"]
        if fmt == "s1k":
            return prompt, ["thinking_trajectories", "attempt"]
        return prompt, [f"{trace}_thinking_trajectory", f"{trace}_attempt"]
    defaults = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "generic": ("prompt", "response")}
    p, r = defaults[fmt]
    return prompt_column or p, [response_column or r]


def convert_rows(rows: list[dict], fmt: str, *, trace: str = "deepseek", layout: str = "s1",
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, prompt_column: str | None = None,
                 response_column: str | None = None) -> list[dict]:
    """Rows of `fmt` -> [{"prompt": messages, "response": str, "source_index": i}] (see module doc)."""
    if not rows:
        raise ValueError("the input has no rows")
    pcol, rcols = _source_columns(fmt, trace, prompt_column, response_column)
    require_columns(rows, [pcol, *rcols])
    out = []
    for i, row in enumerate(rows):
        raw_prompt = row.get(pcol)
        if fmt == "generic" and not isinstance(raw_prompt, str):
            try:
                messages = [{"role": m["role"], "content": m["content"]} for m in to_messages(raw_prompt)]
            except ValueError as e:
                raise ValueError(f"row {i}: column '{pcol}': {e}") from None
        else:
            messages = to_messages(text_field(row, pcol, i))
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages

        if fmt in ("s1k-1.1", "s1k") and trace != "none":
            if fmt == "s1k":
                parts = row.get(rcols[0])
                parts = [parts] if isinstance(parts, str) else parts
                if not isinstance(parts, list) or not parts or not all(isinstance(s, str) for s in parts):
                    raise ValueError(f"row {i}: column '{rcols[0]}' must be a non-empty list of strings")
                trajectory = text_field({rcols[0]: "\n".join(parts)}, rcols[0], i)
            else:
                trajectory = text_field(row, rcols[0], i)
            response = _s1_response(trajectory, text_field(row, rcols[1], i), layout)
        elif fmt == "gsm8k":
            response = gsm8k_response(text_field(row, rcols[0], i), i)
        else:
            response = text_field(row, rcols[0], i)
        out.append({"prompt": messages, "response": response, "source_index": i})
    return out


def find_duplicates(examples: list[dict]) -> list[int]:
    """Indices of examples whose (prompt, response) appeared earlier."""
    seen, dups = set(), []
    for i, ex in enumerate(examples):
        key = (json.dumps(ex["prompt"], sort_keys=True), ex["response"])
        if key in seen:
            dups.append(i)
        seen.add(key)
    return dups


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) row indices, each in input order; val gets round(n * fraction), at least 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 rows for a train/val split, got {n}")
    import numpy as np

    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


# ---------------------------------------------------------------------------------------------------
# Writing, all or nothing


def _prompt_table(examples: list[dict]):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("prompt", pa.list_(message)), ("response", pa.string()), ("source_index", pa.int64())])
    return pa.Table.from_pylist(examples, schema=schema)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (to remove it again on failure)."""
    path = path.absolute()
    return next((p for p in [*reversed(path.parents), path] if not p.exists()), None)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it becomes `out` (replacing it when
    `overwrite`), on failure it vanishes, along with any parent directories made for it."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose another --out")
    made = _first_missing(out.parent)
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        error = io_error(e, out, tmp)
        if error is None:
            raise
        raise error from e  # a full disk: named as `out`, not its temporary name


# ---------------------------------------------------------------------------------------------------
# The three commands


def prepare(input: str, out: str, fmt: str, *, trace: str | None = None, layout: str | None = None,
            system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, prompt_column: str | None = None,
            response_column: str | None = None, val_fraction: float = 0.1, seed: int = 42,
            limit: int | None = None, dedupe: bool = False, overwrite: bool = False) -> dict:
    """Convert, split and write a prepared dataset to `out`; return its manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}")
    traces = {"s1k-1.1": ("deepseek", "gemini", "none"), "s1k": ("gemini", "none")}
    if fmt in traces:
        trace = trace or traces[fmt][0]
        if trace not in traces[fmt]:
            why = " (s1K's traces are Gemini's; DeepSeek traces are in s1K-1.1)" if fmt == "s1k" else ""
            raise ValueError(f"--trace {trace} does not apply to --format {fmt}; choose {' or '.join(traces[fmt])}{why}")
        layout = layout or "s1"
    elif trace is not None or layout is not None:
        raise ValueError(f"--trace and --layout apply to --format s1k-1.1 and s1k only, not {fmt}")
    if layout not in (None, "s1", "plain"):
        raise ValueError(f"--layout must be s1 or plain, got {layout}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of rows, got {limit}")
    in_path = Path(input).expanduser()
    if not in_path.exists() and not _looks_like_path(input):
        raise FileNotFoundError(f"no such file or directory: {input}; to use a hub dataset, first run "
                                f"'dreamtune data download {input} --out data/raw' and pass --input data/raw")

    if system_prompt is not None and not system_prompt.strip():
        raise ValueError("--system-prompt is empty; pass --no-system-prompt for no system message")

    rows = read_rows(in_path)
    rows = rows[:limit] if limit else rows
    examples = convert_rows(rows, fmt, trace=trace or "none", layout=layout or "s1",
                            system_prompt=system_prompt, prompt_column=prompt_column, response_column=response_column)
    dups = find_duplicates(examples)
    if dups and not dedupe:
        raise ValueError(f"{len(dups)} duplicated rows (same prompt and response), first at row {dups[0]}; "
                         "pass --dedupe to drop them")
    drop = set(dups)
    examples = [ex for i, ex in enumerate(examples) if i not in drop]
    train_idx, val_idx = split_indices(len(examples), val_fraction, seed)
    train, val = _prompt_table([examples[i] for i in train_idx]), _prompt_table([examples[i] for i in val_idx])
    from dreamtune import __version__

    manifest = {
        "format": fmt,
        "input": str(in_path.resolve()),
        "input_sha256": input_sha256(in_path),
        "rows": {"input": len(rows), "train": len(train_idx), "val": len(val_idx), "dropped": len(dups)},
        "seed": seed,
        "val_fraction": val_fraction,
        "system_prompt": system_prompt,
        "settings": {"trace": trace, "layout": layout, "prompt_column": prompt_column,
                     "response_column": response_column, "limit": limit, "dedupe": dedupe,
                     "dreamtune_version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    import pyarrow.parquet as pq

    with atomic_dir(Path(out), overwrite) as tmp:
        pq.write_table(train, tmp / "train.parquet")
        pq.write_table(val, tmp / "val.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _looks_like_path(name: str) -> bool:
    return (name.endswith(DATA_SUFFIXES) or name.startswith((".", "/", "~")) or "\\" in name
            or name.count("/") > 1)


def download(dataset: str, out: str, split: str = "train", config: str | None = None,
             overwrite: bool = False) -> Path:
    """A hub dataset (via `datasets`) or local files -> out/<split>.parquet; return that path."""
    target = Path(out).expanduser() / (re.sub(r"[^\w.-]+", "_", split) + ".parquet")  # "train[:100]" too
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it, or choose another --out")
    local = Path(dataset).expanduser()
    if local.exists() or _looks_like_path(dataset):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = read_rows(local)
        if not rows:
            raise ValueError(f"{local} holds no rows")
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError) as e:
            raise ValueError(f"cannot store {local} as parquet ({str(e).splitlines()[0]}); "
                             "a column holds values of different types") from None
        write = lambda tmp: pq.write_table(table, tmp)  # noqa: E731
    else:
        with hub_offline_if_unreachable() as offline:
            try:
                import datasets

                ds = datasets.load_dataset(dataset, config, split=split)
            except ModuleNotFoundError:
                raise
            except Exception as e:  # the hub, the network and the datasets library fail in many ways
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                why = "the Hub cannot be reached (offline?) and it is not in the local cache" if offline else first
                raise ValueError(f"could not load '{dataset}' (split {split}) from the Hugging Face Hub: {why}; "
                                 "fetch the files on a connected machine and pass a local parquet, jsonl or json "
                                 f"file or directory instead: dreamtune data download PATH --out {out}") from None
        write = lambda tmp: ds.to_parquet(tmp)  # noqa: E731
    made = _first_missing(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file(target, write)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return target
