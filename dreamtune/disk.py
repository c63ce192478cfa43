"""Checkpoint sizes and the disk they need: the trainer's pre-flight, before step 1.

    from dreamtune.disk import preflight, format_bytes
    result = preflight(run_dir, model, cfg, optimizer_groups=groups, trainer_state=state, tokenizer=tok,
                       start=0, total_steps=1000)   # ValueError when the checkpoints cannot fit
    print(result["line"])                           # sizes and free space, one line for the log

`checkpoint_sizes` computes the bytes of a resumable checkpoint (with or without the optimizer state) and
of checkpoint-final from the parameters before anything is written; `plan_disk` adds up what a run writes
at its worst moment (keep_last + 1 checkpoints, then the final export); `check_disk` compares that with
the free space. dreamtune.checkpoint (the writer) uses `dir_bytes`, `format_bytes` and `existing_parent`
for its log lines and its full-disk message.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch


def dir_bytes(path: Path) -> int:
    """The bytes of the files under `path` (their sizes, as `du --apparent-size` counts them)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if abs(n) >= 10 * scale else 2}f} {unit}"
    return f"{int(n)} B"


def existing_parent(path: Path) -> Path:
    """`path` or its nearest existing parent (where a directory still to be made will live)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def checkpoint_sizes(model, optimizer_groups: list[dict], *, trainable_only: bool, state_dtype, trainer_state: dict,
                     tokenizer=None, tied: bool = False) -> dict:
    """Bytes of one resumable checkpoint ("resumable": weights + AdamW moments + steps; "weights": the
    weights-only kind) and of checkpoint-final ("final": bf16 safetensors + config + tokenizer), computed from
    the parameters' counts and dtypes before anything is written. The containers' own bytes (DCP's metadata
    and one torch.save record per tensor, the safetensors header, the tokenizer files) are measured by
    writing the same structure with empty tensors to a temporary directory.

    model: the (peft-wrapped) model before FSDP; optimizer_groups: the optimizer's param_groups without
    "params"; state_dtype: the moments' dtype (None: each parameter's own)."""
    import tempfile

    import torch.distributed.checkpoint as dcp

    # the keys and tensors DCP's get_model_state_dict gives for this plain (not yet sharded) module, without
    # its collectives: only rank 0 runs this
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    msd = {k: v for k, v in model.state_dict().items() if not trainable_only or k in trainable}
    weights = sum(v.numel() * v.element_size() for v in msd.values())
    moments = sum(2 * v.numel() * (state_dtype or v.dtype).itemsize for v in msd.values())
    skeleton_model = {k: torch.empty(0, dtype=v.dtype) for k, v in msd.items()}
    skeleton_optim = {"state": {k: {"step": torch.tensor(0.0), "exp_avg": torch.empty(0, dtype=state_dtype or v.dtype),
                                    "exp_avg_sq": torch.empty(0, dtype=state_dtype or v.dtype)} for k, v in msd.items()},
                      "param_groups": [{**g, "params": list(msd)} for g in optimizer_groups]}
    state_json = len(json.dumps({**trainer_state, "step": 10**9, "optimizer_state": True}, indent=2))
    # checkpoint-final: every weight of the (merged) model in bf16 under its HF name
    final_tensors = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or (tied and k.endswith("lm_head.weight")):
            continue
        final_tensors[k.removeprefix("base_model.model.").replace(".base_layer.", ".")] = v
    final_data = sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in final_tensors.values())
    header = len(json.dumps({k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 10**10]}
                             for k, v in final_tensors.items()}, separators=(",", ":"))) + 8
    with tempfile.TemporaryDirectory(prefix="dreamtune-size-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": skeleton_model}, checkpoint_id=f"{tmp}/weights", no_dist=True)
        dcp.save({"model": skeleton_model, "optim": skeleton_optim}, checkpoint_id=f"{tmp}/full", no_dist=True)
        containers = {kind: dir_bytes(Path(tmp) / kind) for kind in ("weights", "full")}
        files = 0
        if tokenizer is not None:
            tokenizer.save_pretrained(f"{tmp}/tokenizer")
            files = dir_bytes(Path(tmp) / "tokenizer")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = len(inner.config.to_json_string()) + 1024  # config.json, generation_config.json, dreamtune.json
    return {"resumable": weights + moments + containers["full"] + state_json,
            "weights": weights + containers["weights"] + state_json,
            "final": final_data + header + files + config}


def plan_disk(run_dir: Path, sizes: dict, *, with_optimizer: bool, keep_last: int, save_steps: list[int],
              final_exports: int) -> dict:
    """The most bytes this run will add to the disk at any moment: resumable checkpoints written at
    `save_steps` (each one whole before the oldest beyond keep_last is removed, so keep_last + 1 exist for a
    moment), then `final_exports` copies of checkpoint-final beside the kept ones. Checkpoints already in
    the run directory count with their real sizes."""
    ckpt = sizes["resumable" if with_optimizer else "weights"]
    on_disk = {int(p.name.split("-")[1]): dir_bytes(p) for p in Path(run_dir).glob("checkpoint-*")
               if re.fullmatch(r"checkpoint-\d+", p.name)} if Path(run_dir).is_dir() else {}
    before = sum(on_disk.values())
    peak, at_once = before, len(on_disk)
    for s in save_steps:
        on_disk[s] = ckpt
        peak, at_once = max(peak, sum(on_disk.values())), max(at_once, len(on_disk))
        for old in sorted(on_disk)[:-keep_last] if keep_last > 0 else []:
            del on_disk[old]
    peak = max(peak, sum(on_disk.values()) + final_exports * sizes["final"])
    return {"need": max(0, peak - before), "checkpoint": ckpt, "final": sizes["final"], "final_exports": final_exports,
            "at_once": at_once, "where": existing_parent(run_dir),
            "free": shutil.disk_usage(existing_parent(run_dir)).free}


def check_disk(plan: dict, *, keep_last: int, with_optimizer: bool, weights_bytes: int) -> str | None:
    """ValueError when the run's checkpoints cannot fit (one line: the numbers and the choices); a warning
    line when they take most of the free space; None when there is room."""
    need, free = plan["need"], plan["free"]
    what = (f"{plan['at_once']} resumable checkpoint(s) of {format_bytes(plan['checkpoint'])} at once"
            + (f" + checkpoint-final {format_bytes(plan['final'])}" + (" x 2 (Dream format too)" if plan["final_exports"] > 1 else "")
               if plan["final_exports"] else ""))
    choices = (f"lower trainer.keep_last (now {keep_last})"
               + (f", set trainer.save_optimizer=false (weights only: {format_bytes(weights_bytes)} a checkpoint)" if with_optimizer else "")
               + ", raise trainer.save_checkpoint_steps, or set trainer.default_local_dir to a disk with more room")
    if need > free:
        raise ValueError(f"not enough disk space for this run's checkpoints in {plan['where']}: {format_bytes(need)} needed "
                         f"({what}), {format_bytes(free)} free; {choices}")
    if need > 0.8 * free:
        return (f"warning: this run's checkpoints need {format_bytes(need)} of the {format_bytes(free)} free in "
                f"{plan['where']} ({what}); if anything else fills the disk a save will fail: {choices}")
    return None


def preflight(run_dir: Path, model, cfg, *, optimizer_groups: list[dict], trainer_state: dict, tokenizer,
              start: int, total_steps: int) -> dict:
    """Before step 1: this run's checkpoint sizes and the disk they need at most (the saves from `start` to
    the end of this process's steps, keep_last, checkpoint-final [and -dream]), against the free space of
    the run directory. ValueError when they cannot fit; the result has a "warning" when they are tight and
    a "line" for the log."""
    t = cfg.trainer
    sizes = checkpoint_sizes(model, optimizer_groups, trainable_only=cfg.model.lora_rank > 0,
                             state_dtype=torch.bfloat16 if cfg.optim.state_dtype == "bfloat16" else None,
                             trainer_state=trainer_state, tokenizer=tokenizer,
                             tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    end = total_steps if t.max_steps_this_run is None else min(total_steps, start + t.max_steps_this_run)
    disk = plan_disk(run_dir, sizes, with_optimizer=t.save_optimizer, keep_last=t.keep_last,
                     save_steps=[s for s in range(start + 1, end + 1) if s % t.save_checkpoint_steps == 0 or s == end],
                     final_exports=(1 + t.export_dream) if end == total_steps else 0)
    warning = check_disk(disk, keep_last=t.keep_last, with_optimizer=t.save_optimizer, weights_bytes=sizes["weights"]) \
        if t.check_disk else None
    line = (f"checkpoints: resumable {format_bytes(sizes['resumable'])} (weights only {format_bytes(sizes['weights'])}), "
            f"checkpoint-final {format_bytes(sizes['final'])}; this run needs up to {format_bytes(disk['need'])} "
            f"of the {format_bytes(disk['free'])} free in {disk['where']}")
    return {**sizes, "line": line, "warning": warning}
