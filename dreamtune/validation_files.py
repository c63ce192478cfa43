"""Where data validation reports live: the dataset's own report, side files for what-if settings, and
the copy a training run keeps (docs/artifacts.md).

A prepared DIR's `validation.json` is the dataset's report. `dreamtune data validate` writes there unless
that file holds a report of other settings, which it then keeps (`choose_report_path`); the trainer
copies the report that matches its data and max_length into RUN/data_validation.json
(`copy_data_validation`), where `dreamtune report RUN` finds it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path


def default_report_path(data: str) -> Path:
    """DIR/validation.json for a prepared DIR (or a file in one); otherwise ./NAME.validation.json, so
    that checking someone else's data never writes into their folder."""
    path = Path(data).expanduser()
    home = path if path.is_dir() else path.parent
    if (home / "manifest.json").exists():
        return home / "validation.json"
    return Path.cwd() / f"{path.stem if path.is_file() else path.name}.validation.json"


def tokenizer_ref(name) -> str:
    """A tokenizer as a report records it: a local directory as its absolute path (so that a notebook or
    report run from another folder finds it), a hub id as given."""
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if str(name) and path.is_dir() else str(name)


def report_settings(data: str, tokenizer_name: str, max_length: int, prompt_key: str, response_key: str) -> dict:
    """What a report depends on: two reports with equal settings describe the same thing."""
    return {"data": str(Path(data).expanduser().resolve()), "tokenizer": tokenizer_ref(tokenizer_name),
            "max_length": int(max_length), "prompt_column": prompt_key, "response_column": response_key}


def _settings_of(path: Path) -> dict | None:
    """The settings of the report at `path` (reports before `settings` was recorded: from their fields);
    None when the file is not a readable validation report."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict):
        return None
    if isinstance(old.get("settings"), dict):
        return old["settings"]
    if "max_length" not in old:
        return None
    return {"data": str(Path(str(old.get("data", ""))).expanduser().resolve()), "tokenizer": tokenizer_ref(old.get("tokenizer", "")),
            "max_length": old.get("max_length"), "prompt_column": "prompt", "response_column": "response"}


def _describe(settings: dict | None) -> str:
    if not settings:
        return "other contents"
    return f"tokenizer {settings.get('tokenizer')}, max_length {settings.get('max_length')}"


def choose_report_path(data: str, out: str | None, settings: dict) -> tuple[Path, str | None]:
    """(where the report goes, a notice for the user or None). --out is used as given (replacing a
    report made with other settings is said). Without it, the default path is used unless it holds a
    report of other settings (the dataset's own, say at max_length 2048): a what-if such as
    --max-length 16 then goes to a side file named by what differs (validation.max_length-16.json),
    so the dataset's report, which the trainer copies into its runs, is never replaced silently."""
    if out:
        path = Path(out).expanduser()
        old = _settings_of(path) if path.is_file() else settings
        note = None if old == settings else f"replaced {path}, which held a report of {_describe(old)}"
        return path, note
    default = default_report_path(data)
    if not default.exists():
        return default, None
    old = _settings_of(default)
    if old == settings:
        return default, None  # the same report, measured again
    differs = [k for k in settings if old is None or old.get(k) != settings[k]]
    label = {"prompt_column": "prompt", "response_column": "response"}
    parts = [f"{label.get(k, k)}-{Path(settings[k]).name if k in ('data', 'tokenizer') else settings[k]}" for k in differs]
    side = default.with_name("validation." + re.sub(r"[^A-Za-z0-9_.-]+", "-", ".".join(parts)) + ".json")
    if side.exists() and _settings_of(side) not in (None, settings):  # a name clash of two other what-ifs
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        side = default.with_name(f"validation.{digest}.json")
    return side, (f"{default} holds the report of {_describe(old)} and is kept; this one (max_length "
                  f"{settings['max_length']}) went to {side}; choose the file with --out")


def copy_data_validation(train_files, max_length: int, run_dir) -> Path | None:
    """Copy the training data's validation report (and its PNG) into RUN/data_validation.json; return the
    source, or None when the data has no report. The report made at the run's max_length wins (a side
    file such as validation.max_length-2048.json, or validation.json itself); otherwise validation.json,
    whatever its max_length (the report says which it was measured at)."""
    from dreamtune.atomic import write_file, write_text

    files = [train_files] if isinstance(train_files, (str, Path)) else list(train_files)
    if not files:
        return None
    default = default_report_path(str(files[0]))
    candidates = [default.with_name(f"validation.max_length-{int(max_length)}.json"), default]
    found = [c for c in candidates if c.is_file() and _settings_of(c) is not None]
    if not found:
        return None
    src = next((c for c in found if (_settings_of(c) or {}).get("max_length") == int(max_length)), found[-1])
    run_dir = Path(run_dir)
    write_text(run_dir / "data_validation.json", src.read_text(encoding="utf-8"))
    png = src.with_suffix(".png")
    if png.is_file():
        write_file(run_dir / "data_validation.png", lambda tmp: Path(tmp).write_bytes(png.read_bytes()))
    return src
