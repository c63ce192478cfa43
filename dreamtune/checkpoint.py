"""Checkpoints: resumable sharded state, the final bf16 export, and `dreamtune export`.

A resumable checkpoint `RUN/checkpoint-STEP/` holds the model and optimizer state written with
torch.distributed.checkpoint (each rank writes its own shards; nothing is gathered on rank 0; for LoRA
only the trainable adapter weights are stored), plus `trainer_state.json` (step, config, seed, data
position). Random state needs no saving: every random draw of a step comes from a generator seeded by
(seed, step, rank, micro-batch), so a resumed run draws exactly what an uninterrupted one would.

Writes are atomic: everything goes to `.checkpoint-STEP.tmp-*` and is renamed into place when complete,
then `RUN/latest` is replaced atomically. A crash during a save leaves the previous checkpoint intact.

The final export (`RUN/checkpoint-final/`) is a bf16 Hugging Face directory (about 15 GB for 7B, not the
90 GB of fp32 weights plus optimizer state the upstream trainer writes); LoRA adapters are merged in.

`dreamtune export` (dreamtune/export_cli.py) re-exports such a directory in another format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dreamtune import distributed as D
from dreamtune.atomic import temp_dir_beside, write_text

LATEST = "latest"
STATE = "trainer_state.json"


def _dcp_options(full: bool = False, trainable_only: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable_only, strict=strict)


def save_resumable(run_dir: Path, step: int, model, optimizer, state: dict, *, trainable_only: bool, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = D.broadcast_object(str(temp_dir_beside(run_dir / f"checkpoint-{step}")) if not dist.is_initialized() or dist.get_rank() == 0 else None)
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options(trainable_only=trainable_only))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    D.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(tmp) / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text(run_dir / LATEST, final.name)
        prune(run_dir, keep_last)
    D.barrier()
    return final


def load_resumable(ckpt: Path, model, optimizer, *, trainable_only: bool) -> dict:
    """Collective: restore model and optimizer in place; returns trainer_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    if not (ckpt / STATE).exists():
        raise ValueError(f"'{ckpt}' is not a complete dreamtune checkpoint (no {STATE}); point trainer.resume_path at a checkpoint-STEP directory")
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options(trainable_only=trainable_only))
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(sd, checkpoint_id=str(ckpt))
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as e:  # noqa: BLE001  DCP's CheckpointException (a BaseException) wraps each rank's error
            lines = [x.strip() for x in str(e).splitlines() if "mismatch" in x or "Missing key" in x]
            why = f" ({lines[0][:200]})" if lines else ""
            raise ValueError(f"'{ckpt}' does not fit this model and settings{why}: it was written with another model, "
                             f"LoRA rank or LoRA/full setting; resume with the settings it was trained with") from None
    # a LoRA checkpoint holds the adapters only: the frozen base is "missing" on purpose, so the load is
    # not strict, and the keys that must be there (the trainable ones) are checked below
    result = set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                            options=_dcp_options(trainable_only=trainable_only, strict=not trainable_only))
    missing = [k for k in getattr(result, "missing_keys", []) if k in msd]
    if missing:
        raise ValueError(f"'{ckpt}' lacks {len(missing)} trainable tensors (e.g. {missing[0]}): it was written with "
                         f"another model or LoRA setting; resume with the settings it was trained with")
    return json.loads((ckpt / STATE).read_text())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in a run directory, or None."""
    run_dir = Path(run_dir)
    marker = run_dir / LATEST
    if marker.exists():
        p = run_dir / marker.read_text().strip()
        if (p / STATE).exists():
            return p
    done = sorted((p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / STATE).exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def prune(run_dir: Path, keep_last: int) -> None:
    steps = sorted((p for p in Path(run_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    for p in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(".checkpoint-*.tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(p, ignore_errors=True)


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """peft's state dict (base_model.model.* keys, lora_A/lora_B pairs) -> plain HF keys with
    W' = W + scale * B @ A merged in. Pure; works on a gathered full state dict."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k or ".lora_" in k:
            continue
        name = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if k.endswith(".base_layer.weight"):
            stem = k[: -len(".base_layer.weight")]
            a = next((sd[x] for x in sd if x.startswith(stem + ".lora_A.") and x.endswith(".weight")), None)
            b = next((sd[x] for x in sd if x.startswith(stem + ".lora_B.") and x.endswith(".weight")), None)
            if a is not None and b is not None:
                v = (v.float() + scale * (b.float() @ a.float())).to(v.dtype)
        out[name] = v
    return out


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Collective: the whole model's state on CPU (rank 0 receives it; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=_dcp_options(full=True))
