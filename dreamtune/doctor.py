"""`dreamtune doctor`: the environment check before a run (Python, torch, CUDA, GPUs, disk, extras), in one table.

    dreamtune doctor [--out-dir DIR]

Reports Python, torch, transformers and CUDA versions, each GPU's name and memory, the free disk where
runs will be written, and which optional extras are importable. Exits 1 when a required piece is missing
(Python < 3.10, torch or transformers absent or too old); missing extras only get a hint.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import shutil
import sys
from pathlib import Path

REQUIRED = {"torch": "2.6", "transformers": "5.17", "safetensors": None, "omegaconf": "2.3", "tokenizers": None,
            "numpy": None, "yaml": None, "tqdm": None}
EXTRAS = {  # extra -> the modules it brings
    "data": ["datasets", "pyarrow"], "lora": ["peft"], "eval": ["math_verify"], "logging": ["tensorboard", "wandb"],
    "report": ["matplotlib"], "demo": ["gradio"], "notebooks": ["nbclient", "nbformat"],
}
DIST_NAMES = {"yaml": "pyyaml", "math_verify": "math-verify"}


def _version(module: str) -> str | None:
    try:
        return md.version(DIST_NAMES.get(module, module))
    except md.PackageNotFoundError:
        try:
            return getattr(importlib.import_module(module), "__version__", "?")
        except ImportError:
            return None


def _older(v: str, minimum: str) -> bool:
    def parts(s):
        out = []
        for p in s.split("+")[0].split(".")[:3]:
            digits = "".join(c for c in p if c.isdigit())
            out.append(int(digits) if digits else 0)
        return out
    return parts(v) < parts(minimum)


def main(argv: list[str] | None = None) -> int:
    from dreamtune.cli import parser

    ap = parser("dreamtune doctor", "check the environment")
    ap.add_argument("--out-dir", default=".", help="where runs will be written (its free disk is reported)")
    a = ap.parse_args(argv)
    problems: list[str] = []
    rows: list[tuple[str, str]] = [("python", f"{platform.python_version()} ({sys.executable})")]
    if sys.version_info < (3, 10):
        problems.append("Python >= 3.10 is required")
    for mod, minimum in REQUIRED.items():
        v = _version(mod)
        if v is None:
            problems.append(f"{mod} is not installed: pip install dreamtune")
            rows.append((mod, "MISSING"))
        elif minimum and _older(v, minimum):
            problems.append(f"{mod} {v} is older than {minimum}: pip install -U '{mod}>={minimum}'")
            rows.append((mod, f"{v} (need >= {minimum})"))
        else:
            rows.append((mod, v))

    try:
        import torch

        rows.append(("cuda", f"{torch.version.cuda} (available: {torch.cuda.is_available()})" if torch.version.cuda else "none (CPU build of torch)"))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                rows.append((f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, bf16: {torch.cuda.is_bf16_supported()}"))
        else:
            rows.append(("gpu", "none: training and generation run on the CPU (tiny models only)"))
        rows.append(("cpu threads", str(torch.get_num_threads())))
    except ImportError:
        pass

    out = Path(a.out_dir).resolve()
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / 2**30
    rows.append(("disk free", f"{free:.1f} GiB at {probe} (a 7B bf16 export is ~15 GiB; a full resumable checkpoint ~90 GiB)"))
    if not probe.is_dir():
        problems.append(f"--out-dir {out}: {probe} is a file, so no run can be written there; choose another --out-dir")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"--out-dir {out}: {probe} is not writable (a read-only filesystem or no permission); "
                        f"choose another --out-dir")

    for extra, mods in EXTRAS.items():
        have = {m: _version(m) for m in mods}
        missing = [m for m, v in have.items() if v is None]
        status = "ok (" + ", ".join(f"{m} {v}" for m, v in have.items() if v) + ")" if not missing else \
            f"missing {', '.join(missing)}: pip install 'dreamtune[{extra}]'"
        rows.append((f"extra [{extra}]", status))

    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    print("ok: the required pieces are present")
    return 0
