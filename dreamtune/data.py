"""Datasets for masked-diffusion SFT: `dreamtune data download | prepare | validate`, and the helpers
the trainer imports to read and encode rows.

A prepared dataset (docs/artifacts.md) is DIR/train.parquet and DIR/val.parquet, with `prompt` (a list
of {role, content} chat messages) and `response` (a string), plus DIR/manifest.json. Training renders
a row as: prompt ids = the chat template with the generation prompt; response ids = the response text
+ eos (`encode_example`). `dreamtune data validate` renders rows with the same code.

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
A system message (default: the user's plan's "You are a helpful AI assistant. Think step by step.")
is put before the user turn unless the prompt already starts with one; `--no-system-prompt` leaves it
out (note: ChatML templates such as Dream's then insert their own default system turn).

Every output appears whole or not at all: files are written under a temporary name beside the target
and renamed into place, after every input check has passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

# The row checks live with `validate`; they are part of this module's API (the trainer imports them).
from dreamtune.data_validate import check_columns, require_columns, text_field, to_messages  # noqa: F401

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


def _read_json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any mkdir
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def write_file_atomically(path: Path, write) -> None:
    """Call write(tmp_path) for a temporary name beside `path` (same suffix), then rename into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


@contextlib.contextmanager
def hub_offline_if_unreachable(timeout: float = 3.0):
    """Run the block in Hugging Face offline mode when the hub cannot be reached, so that a missing
    network fails at once (cached files still load) instead of after about 25 s of retries. Yields
    whether it did so."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        if not (offline or proxied):
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield False
        return
    import huggingface_hub.constants as hub_constants

    # The libraries read HF_HUB_OFFLINE at import: set the variable for a later `import datasets`, and
    # the already-imported flags; put everything back afterwards.
    ds_config = sys.modules.get("datasets.config")
    saved = hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE if ds_config else False
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    if ds_config:
        ds_config.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)
        hub_constants.HF_HUB_OFFLINE = saved[0]
        if "datasets.config" in sys.modules:
            sys.modules["datasets.config"].HF_HUB_OFFLINE = saved[1]


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
        write_file_atomically(target, write)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return target


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes become a ValueError: one `error:` line from the CLI, exit 2."""

    def error(self, message):
        raise ValueError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamtune data", description="Download, prepare and validate SFT datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{download,prepare,validate}")

    d = sub.add_parser("download", help="a hub dataset id or local parquet/jsonl/json -> DIR/<split>.parquet")
    d.add_argument("dataset", help="hub id (e.g. simplescaling/s1K-1.1) or a local file or directory")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--split", default="train")
    d.add_argument("--config", default=None, help="hub dataset configuration (e.g. 'main' for openai/gsm8k)")
    d.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prepare", help="convert rows to prompt/response, split, write train/val parquet",
                       description=__doc__[__doc__.index("Formats of"):__doc__.index("Every output")],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="parquet, jsonl or json file, or a directory of them")
    p.add_argument("--out", required=True, help="output directory (must be absent or empty, or --overwrite)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--trace", choices=("deepseek", "gemini", "none"), default=None,
                   help="s1k-1.1: deepseek (default), gemini or none (the reference solution); s1k: gemini or none")
    p.add_argument("--layout", choices=("s1", "plain"), default=None, help="s1 (default): s1's think/answer text")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help=f"default: {DEFAULT_SYSTEM_PROMPT!r}")
    system.add_argument("--no-system-prompt", action="store_true", help="no system message")
    p.add_argument("--prompt-column", default=None)
    p.add_argument("--response-column", default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use only the first N input rows")
    p.add_argument("--dedupe", action="store_true", help="drop duplicated rows instead of failing")
    p.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("validate", help="token lengths, truncation and answer loss, as training will see them")
    v.add_argument("--data", required=True, help="a prepared DIR (train + val) or a parquet/jsonl/json file")
    v.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    v.add_argument("--max-length", type=int, required=True)
    v.add_argument("--out", default=None, help="report path (default: DIR/validation.json for a prepared DIR, "
                   "else ./NAME.validation.json); the PNG goes beside it")
    v.add_argument("--prompt-column", default="prompt")
    v.add_argument("--response-column", default="response")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "download":
        target = download(args.dataset, args.out, args.split, args.config, args.overwrite)
        print(f"wrote {target}")
        print(f"next: dreamtune data prepare --input {target} --out DIR --format {'|'.join(FORMATS)}")
    elif args.command == "prepare":
        m = prepare(args.input, args.out, args.fmt, trace=args.trace, layout=args.layout,
                    system_prompt=None if args.no_system_prompt else args.system_prompt,
                    prompt_column=args.prompt_column, response_column=args.response_column,
                    val_fraction=args.val_fraction, seed=args.seed, limit=args.limit, dedupe=args.dedupe,
                    overwrite=args.overwrite)
        s, r = m["settings"], m["rows"]
        how = f" (trace {s['trace']}, layout {s['layout']})" if s["trace"] else ""
        print(f"prepared {r['input']} rows of {m['format']}{how}: train {r['train']}, val {r['val']}, "
              f"dropped {r['dropped']} -> {args.out}")
        print(f"next: dreamtune data validate --data {args.out} --tokenizer TOKENIZER --max-length 2048")
    else:
        from dreamtune.data_validate import print_summary, validate

        report = validate(args.data, args.tokenizer, args.max_length, out=args.out,
                          prompt_key=args.prompt_column, response_key=args.response_column)
        print_summary(report)
    return 0
