"""Where a 7B training step's time goes: torch.profiler over one variant of bench/train_step.py
(default `full-lean-noac`: compiled layers, no checkpointing, bf16 AdamW moments) at 2 x 2048.

    python bench/profile_step.py [--variant full] [--shape 2x2048]   # one GPU; $OUT/profile_<variant>.txt
    python bench/profile_step.py --tiny                              # a CPU smoke run

Prints the CUDA kernels that take the most time (CPU ops with --tiny), after two warm-up steps.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import DREAM7B, TINY, setup_variant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="full-lean-noac")
    ap.add_argument("--shape", default="2x2048")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cpu" if a.tiny else "cuda")
    B, L = (2, 32) if a.tiny else (int(x) for x in a.shape.split("x"))
    step, _, _ = setup_variant(a.variant, TINY if a.tiny else DREAM7B, B, L, dev)
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    activity = ProfilerActivity.CPU if a.tiny else ProfilerActivity.CUDA
    with profile(activities=[activity]) as prof:
        for _ in range(2):
            step()
        sync()
    sort = "cpu_time_total" if a.tiny else "cuda_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    print(f"# {a.variant} at {B}x{L}, two steps\n{table}")
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{a.variant}_{B}x{L}.txt").write_text(f"# {a.variant} at {B}x{L}, two steps\n{table}")


if __name__ == "__main__":
    main()
