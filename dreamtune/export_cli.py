"""`dreamtune export`: re-export a model directory as an HF, Dream-format or LLaDA-format directory.

    dreamtune export RUN/checkpoint-final --out DIR [--format hf|dream|llada] [--dtype bf16|fp32] [--overwrite]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    """`dreamtune export SRC --out DIR [--format hf|dream|llada] [--dtype bf16|fp32] [--overwrite]`: re-export a model
    directory. An existing non-empty --out is replaced only with --overwrite."""
    from dreamtune.export import save_dream, save_hf, save_llada
    from dreamtune.models import load

    from dreamtune.cli import parser

    ap = parser("dreamtune export", main.__doc__)
    ap.add_argument("src", help="a model directory (e.g. RUN/checkpoint-final) or hub id")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["hf", "dream", "llada"], default="hf")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is whole)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; add --overwrite to replace it, or choose another path")
    from transformers.utils import logging as hf_logging

    lm = load(a.src, dtype="fp32")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    hf_logging.enable_progress_bar()  # a 7B export writes ~15 GB: the shard writer's bar shows the time left
    out = {"hf": save_hf, "dream": save_dream, "llada": save_llada}[a.format](lm, a.out, dtype=dtype)
    print(f"wrote {a.format} directory {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
