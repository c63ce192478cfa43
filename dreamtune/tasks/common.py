"""Shared helpers for the benchmark loaders: local JSONL files, the Hub, uniform answers.

Every benchmark loader returns rows `{"id": str, "task": str, "question": str, "answer": str, ...}`.
Local files follow one layout: `<data_dir>/<name>/test.jsonl` (gsm8k also `train.jsonl`, for shots).
`resolve_data_dir` is how `dreamtune eval` and `dreamtune compare` find that directory by themselves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

DATA_ENV = "DREAMTUNE_EVAL_DATA"
DEFAULT_DATA_DIR = Path("data") / "eval"
LAYOUT = "DIR/<task>/test.jsonl, e.g. DIR/gsm8k/test.jsonl"


def resolve_data_dir(data_dir) -> tuple[str | None, str]:
    """(directory or file of local benchmark files, where that choice came from) for eval and compare:
    --data-dir when given, else $DREAMTUNE_EVAL_DATA, else ./data/eval when it exists; (None, "the Hub")
    when none is set. A setting that names a missing path is a ValueError (a typo must not fall back to
    a download)."""
    if data_dir is not None:
        return str(data_dir), "--data-dir"
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        if not Path(env).expanduser().exists():
            raise ValueError(f"{DATA_ENV}={env} does not exist; point it at your benchmark files ({LAYOUT}) "
                             f"or unset it")
        return env, f"${DATA_ENV}"
    if DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR), f"the default folder ./{DEFAULT_DATA_DIR}"
    return None, "the Hugging Face Hub"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a local JSONL file, read as the data pipeline reads them (dreamtune.data.read_rows)."""
    from dreamtune.data import read_rows

    return read_rows(str(path))


def local_file(name: str, data_dir: str | Path, split: str = "test") -> Path:
    """`<data_dir>/<name>/<split>.jsonl`; a .jsonl file given directly is used as is."""
    d = Path(data_dir).expanduser()
    if d.is_file():
        if split != "test":
            raise ValueError(f"--data-dir {d} is a file, but the {split} split of {name} is needed: pass the directory "
                             f"with {name}/{split}.jsonl")
        return d
    path = d / name / f"{split}.jsonl"
    if not path.is_file():
        if not d.exists():
            raise ValueError(f"benchmark folder {d} does not exist; expected the layout {d}/{name}/{split}.jsonl")
        raise ValueError(
            f"no {name} data in the benchmark folder {d}: expected the file {path} "
            f"(layout <folder>/<task>/{split}.jsonl); add the file or pass --data-dir with another folder"
        )
    return path


def source_rows(name: str, data_dir, hub: dict, split: str | None = None) -> tuple[list[dict], str]:
    """(raw rows, where they came from): `<data_dir>/<name>/<split>.jsonl`, or the Hub when data_dir is None.
    hub maps a task name to (repo, config, split)."""
    repo, config, hub_split = hub[name]
    if data_dir is None:
        return hub_rows(name, repo, config, split or hub_split), repo
    path = local_file(name, data_dir, split or "test")
    return read_jsonl(path), str(path)


def hub_rows(name: str, repo: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hub dataset through `datasets`; any failure -> ValueError suggesting --data-dir."""
    hint = (
        f"use your own files instead: put them in ./{DEFAULT_DATA_DIR}/{name}/test.jsonl, or pass --data-dir DIR "
        f"(or set {DATA_ENV}=DIR) with DIR/{name}/test.jsonl; data_dir= in Python"
    )
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"loading {name} from the Hub needs the 'datasets' package (pip install 'dreamtune[data]'); or {hint}") from None
    try:
        ds = load_dataset(repo, config, split=split) if config else load_dataset(repo, split=split)
    except Exception as e:  # offline, renamed, gated: all the same to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load {name} from the Hugging Face Hub ({repo}, split {split}): {msg}; {hint}") from None
    return [dict(r) for r in ds]


def pick(row: dict, *keys: str, what: str, where: str):
    """The first present key of `keys` (datasets spell their columns differently)."""
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise ValueError(f"{where}: a row has no {what} field (looked for {', '.join(keys)}); keys are {sorted(row)}")


def canonical_answer(value) -> str:
    """Numbers as plain text ("025" -> "25", 27.0 -> "27", 70 -> "70"); other text stripped."""
    if isinstance(value, bool):
        raise ValueError(f"an answer must be text or a number, not {value!r}")
    if isinstance(value, float):
        assert math.isfinite(value), value
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    s = str(value).strip()
    t = s.replace(",", "") if s.replace(",", "").lstrip("+-").isdigit() else s
    if t.lstrip("+-").isdigit():
        return str(int(t))
    try:
        f = float(t)
    except ValueError:
        return s
    return str(int(f)) if math.isfinite(f) and f.is_integer() and "e" not in t.lower() else s


def finish(rows: list[dict], limit: int | None) -> list[dict]:
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        rows = rows[:limit]
    for r in rows:
        assert isinstance(r["id"], str) and isinstance(r["question"], str) and isinstance(r["answer"], str), r
    return rows
