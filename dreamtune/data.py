"""Datasets for masked-diffusion SFT: reading rows and rendering them into token ids, as the trainer, `dreamtune
data validate` and generation see them (the `dreamtune data` verb is dreamtune/data_cli.py).

A prepared dataset (docs/artifacts.md) is DIR/train.parquet and DIR/val.parquet, with `prompt` (a list
of {role, content} chat messages) and `response` (a string), plus DIR/manifest.json. Training renders
a row as: prompt ids = the chat template with the generation prompt; response ids = the response text
+ eos (`encode_example`). `dreamtune data validate` renders rows with the same code.

The formats of `prepare --format` are described in dreamtune/data_prepare.py.

Every output appears whole or not at all: files are written under a temporary name beside the target
and renamed into place, after every input check has passed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dreamtune.rows import to_messages

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant. Think step by step."
FORMATS = ("s1k-1.1", "s1k", "gsm8k", "math", "generic")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------------
# Reading rows


def data_files(paths: str | Path | list) -> list[Path]:
    """The data files behind `paths`: files as given; a directory gives its .parquet files, or failing
    that its .jsonl, or failing that its .json (searched recursively, hidden folders skipped)."""
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(p).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"no such file or directory: {p}")
        if p.is_file():
            if p.suffix not in DATA_SUFFIXES:
                raise ValueError(f"{p}: unsupported file type '{p.suffix}'; pass a .parquet, .jsonl or .json file")
            files.append(p)
            continue
        found = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts)]
        for suffix in DATA_SUFFIXES:  # one kind only, so a prepared DIR's manifest.json is not a data file
            if any(f.suffix == suffix for f in found):
                files += [f for f in found if f.suffix == suffix]
                break
        else:
            raise ValueError(f"{p} holds no .parquet, .jsonl or .json files")
    if not files:
        raise ValueError("no input files given")
    return files


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # to_pylist gives plain Python lists and dicts for nested columns (no numpy arrays).
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path} as parquet ({first}); is the file complete? download it again") from None


def json_lines(path: Path, text: str, expected: str = "a JSON object (one row)") -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of JSON lines `text` read from `path`; ValueError naming
    `path:line` for a line that is not JSON or not an object (`expected` says what the line should hold)."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: a JSON string may hold U+2028 or U+0085 as is
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected {expected}, got a JSON {type(row).__name__}")
        rows.append((n, row))
    return rows


def _read_json_lines(path: Path, text: str) -> list[dict]:
    return [row for _, row in json_lines(path, text)]


def _read_json(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)  # JSON lines saved as .json (the datasets library does this)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: a .json file must hold a list of objects (one per row)")
    return data


def read_rows(paths: str | list[str]) -> list[dict]:
    """Rows (dicts) from parquet / jsonl / json files or directories of them, in file order."""
    rows: list[dict] = []
    for path in data_files(paths):
        if path.suffix == ".parquet":
            rows += _read_parquet(path)
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text; is it really {path.suffix}?") from None
        rows += _read_json_lines(path, text) if path.suffix == ".jsonl" else _read_json(path, text)
    return rows


def input_sha256(paths) -> str:
    """sha256 of the input: of the file's bytes for one file (= `sha256sum FILE`), else of the names
    and per-file hashes of every data file read."""
    files = data_files(paths)

    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if len(files) == 1:
        return file_hash(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_hash(f)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Encoding (what training sees)


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has no chat template, and prompts are rendered with it; "
                         "use the model's tokenizer files that include one (tokenizer_config.json 'chat_template')")


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; responses end with eos, so it needs one")
    return int(tokenizer.eos_token_id)


def encode_example(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the chat template with the generation prompt; response + eos."""
    _require_chat_template(tokenizer)
    if not isinstance(response, str):
        raise ValueError(f"a response must be a string, got {type(response).__name__}")
    out = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    return list(ids), list(response_ids) + [_eos_id(tokenizer)]


def render_prompts(tokenizer, prompts) -> list[str]:
    """Each prompt through the chat template (generation prompt added), as text."""
    _require_chat_template(tokenizer)
    return [tokenizer.apply_chat_template(to_messages(p), add_generation_prompt=True, tokenize=False)
            for p in prompts]


def encode_batches(tokenizer, prompts, responses, chunk_size: int = 256):
    """Yield (start, prompt BatchEncoding, response BatchEncoding) per chunk of rows: one fast-tokenizer
    call per chunk instead of one per row; chunks bound the memory of long responses. The eos is NOT
    in these encodings (callers add it)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise ValueError(f"row {i}: a response must be a string, got {type(r).__name__}")
    texts = render_prompts(tokenizer, prompts)
    for start in range(0, len(texts), chunk_size):
        # Tokenizing the rendered text is what apply_chat_template(tokenize=True) does.
        kw = {"add_special_tokens": False, "return_attention_mask": False, "verbose": False}
        p = tokenizer(texts[start:start + chunk_size], **kw)
        r = tokenizer(list(responses[start:start + chunk_size]), **kw)
        yield start, p, r


def encode_examples(tokenizer, prompts, responses) -> list[tuple[list[int], list[int]]]:
    """Batched `encode_example`: the same ids, row by row, much faster."""
    eos = _eos_id(tokenizer)
    out = []
    for _, p, r in encode_batches(tokenizer, prompts, responses):
        out += [(list(a), list(b) + [eos]) for a, b in zip(p.input_ids, r.input_ids)]
    return out
