"""`dreamtune data download | prepare | validate`: the verb over dreamtune.data_prepare and dreamtune.data_validate.

    dreamtune data download simplescaling/s1K-1.1 --out data/s1k
    dreamtune data prepare --input data/s1k --format s1k-1.1 --out data/s1k_dream_format
    dreamtune data validate --data data/s1k_dream_format --tokenizer Dream-org/Dream-v0-Base-7B --max-length 2048
"""

from __future__ import annotations

import argparse
import sys

from dreamtune.cli import parser as cli_parser
from dreamtune.data import DEFAULT_SYSTEM_PROMPT, FORMATS


def _prepare_doc() -> str:
    from dreamtune import data_prepare

    d = data_prepare.__doc__
    return d[d.index("Formats of"):d.index("Every output")]


def _parser() -> argparse.ArgumentParser:
    parser = cli_parser("dreamtune data", "Download, prepare and validate SFT datasets.")
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
    v.add_argument("--out", default=None, help="report path, used as given (default: DIR/validation.json for a "
                   "prepared DIR, else ./NAME.validation.json; when that file holds a report of other settings it is "
                   "kept and this one goes beside it, e.g. validation.max_length-16.json); the PNG goes beside it")
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
