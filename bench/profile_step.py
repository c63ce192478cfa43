"""Where a 7B training step's time goes: torch.profiler over one variant of bench/train_step.py
(default `full-lean-noac`: compiled layers, no checkpointing, bf16 AdamW moments) at 2 x 2048.

    python bench/profile_step.py [--variant full] [--shape 2x2048]   # one GPU; $OUT/profile_<variant>.txt
    python bench/profile_step.py --tiny                              # a CPU smoke run

Prints the CUDA kernels that take the most time (CPU ops with --tiny), after two warm-up steps, then
where the GPU sat idle: gaps between kernels, by step phase (forward / backward / optimizer, as the CPU
was in when the gap began) and by the kernels either side.
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
    activity = [ProfilerActivity.CPU] + ([] if a.tiny else [ProfilerActivity.CUDA])
    with profile(activities=activity) as prof:
        for _ in range(2):
            step()
        sync()
    sort = "cpu_time_total" if a.tiny else "cuda_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    text = f"# {a.variant} at {B}x{L}, two steps\n{table}\n"
    print(text, flush=True)
    try:
        idle = idle_report(prof)
    except Exception as e:  # noqa: BLE001  the kernel table above is the main result
        idle = f"GPU idle report failed: {type(e).__name__}: {e}"
    print(idle)
    text += idle + "\n"
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{a.variant}_{B}x{L}.txt").write_text(text)


def idle_report(prof, min_gap_us: float = 10.0) -> str:
    """GPU idle time between consecutive kernels (gaps of min_gap_us or more), by phase and kernel pair."""
    events = prof.events()
    # kernels and copies only: the phase:* labels also appear as GPU-side ranges spanning a whole phase
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.is_user_annotation and not e.name.startswith(("phase:", "Optimizer.step", "##"))),
                     key=lambda e: e.time_range.start)
    phases = sorted(((e.time_range.start, e.time_range.end, e.name[6:]) for e in events
                     if e.name.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU))
    if not kernels:
        return "GPU idle: no CUDA kernels recorded (CPU run)"
    by_phase, by_pair, total, busy_end = {}, {}, 0.0, kernels[0].time_range.end
    prev = kernels[0]
    for k in kernels[1:]:
        gap = k.time_range.start - busy_end
        if gap >= min_gap_us:
            phase = next((n for s, e, n in phases if s <= busy_end <= e), "between steps")
            by_phase[phase] = by_phase.get(phase, 0.0) + gap
            pair = f"{prev.name[:45]} -> {k.name[:45]}"
            by_pair[pair] = by_pair.get(pair, 0.0) + gap
            total += gap
        if k.time_range.end > busy_end:
            busy_end, prev = k.time_range.end, k
    span = busy_end - kernels[0].time_range.start
    lines = [f"GPU idle in gaps >= {min_gap_us:.0f} us: {total / 1e3:.1f} ms of {span / 1e3:.1f} ms (two steps)"]
    lines += [f"  {n:<14}{t / 1e3:8.1f} ms" for n, t in sorted(by_phase.items(), key=lambda x: -x[1])]
    lines.append("largest by the kernels either side:")
    lines += [f"  {t / 1e3:7.2f} ms  {n}" for n, t in sorted(by_pair.items(), key=lambda x: -x[1])[:15]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
