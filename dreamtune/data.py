"""Datasets for masked-diffusion SFT: `dreamtune data download | prepare | validate`, and the helpers
the trainer imports to read and encode rows.

A prepared dataset (docs/artifacts.md) is DIR/train.parquet and DIR/val.parquet, with `prompt` (a list
of {role, content} chat messages) and `response` (a string), plus DIR/manifest.json. Training renders
a row as: prompt ids = the chat template with the generation prompt; response ids = the response text
+ eos (`encode_example`). `dreamtune data validate` renders rows with the same code.

The formats of `prepare --format` are described in dreamtune/data_prepare.py.

Every output appears whole or not at all: files are written under a temporary name beside the target
and renamed into place, after every input check has passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

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
# Training examples (what the trainer reads)


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


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes become a ValueError: one `error:` line from the CLI, exit 2."""

    def error(self, message):
        raise ValueError(f"{message} (see '{self.prog} --help')")


def _prepare_doc() -> str:
    from dreamtune import data_prepare

    d = data_prepare.__doc__
    return d[d.index("Formats of"):d.index("Every output")]


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
                       description=_prepare_doc(),
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
    from dreamtune.data_prepare import download, prepare

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
