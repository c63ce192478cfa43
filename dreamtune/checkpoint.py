"""Checkpoints: resumable sharded state, the final bf16 export, and `dreamtune export`.

A resumable checkpoint `RUN/checkpoint-STEP/` holds the model and optimizer state written with
torch.distributed.checkpoint (each rank writes its own shards; nothing is gathered on rank 0; for LoRA
only the trainable adapter weights are stored), plus `trainer_state.json` (step, config, seed, data
position). Random state needs no saving: every random draw of a step comes from a generator seeded by
(seed, step, rank, micro-batch), so a resumed run draws exactly what an uninterrupted one would.

Writes are atomic: everything goes to `.checkpoint-STEP.tmp-*` and is renamed into place when complete,
then `RUN/latest` is replaced atomically. A crash during a save leaves the previous checkpoint intact; a
failed save (a full disk) removes its temporary directory and stops the run with one line (RunError).
`Saver` writes in the foreground or in the background (DCP async_save), with or without the optimizer
state. Before step 1, `dreamtune.disk.preflight` sizes the run's checkpoints and checks them against the
free disk.

The final export (`RUN/checkpoint-final/`) is a bf16 Hugging Face directory (about 15 GB for 7B, not the
90 GB of fp32 weights plus optimizer state the upstream trainer writes); LoRA adapters are merged in.

`dreamtune export` (dreamtune/export_cli.py) re-exports such a directory in another format.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dreamtune import distributed as D
from dreamtune.atomic import temp_dir_beside, write_text
from dreamtune.cli import RunError
from dreamtune.disk import dir_bytes, existing_parent, format_bytes
from dreamtune.monitor import LOG

LATEST = "latest"
STATE = "trainer_state.json"


def _dcp_options(full: bool = False, trainable_only: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable_only, strict=strict)


def _state_dicts(model, optimizer, trainable_only: bool, with_optimizer: bool) -> dict:
    """What a resumable checkpoint stores: {"model": ...} (and {"optim": ...} unless weights only)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not with_optimizer:  # no get_state_dict(optimizer): it would initialise the moments with a fake step
        return {"model": get_model_state_dict(model, options=_dcp_options(trainable_only=trainable_only))}
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options(trainable_only=trainable_only))
    return {"model": msd, "optim": osd}


class Saver:
    """Writes resumable checkpoints, in the foreground or (background=True) with DCP's async_save: the state
    is copied to CPU memory, the write runs in a thread while training goes on, and the next save (or
    wait()) finishes it. Either way a checkpoint appears whole or not at all: the shards go to
    `.checkpoint-STEP.tmp-*`, which is renamed into place and named in `latest` only once every rank's write
    succeeded. A failed write (a full disk, any I/O error) removes the temporary directory, leaves the
    earlier checkpoints and `latest` as they were, and raises RunError with one line saying what to do.

    Collective: every rank makes the same calls."""

    def __init__(self, run_dir: Path, *, trainable_only: bool, keep_last: int, with_optimizer: bool = True,
                 background: bool = False, sizes: dict | None = None):
        self.run_dir = Path(run_dir)
        self.trainable_only, self.keep_last = trainable_only, keep_last
        self.with_optimizer, self.background = with_optimizer, background
        self.sizes = sizes or {}
        self.pending = None  # (future, tmp, step, state, t0) of a background write
        self._group = None

    @property
    def is_main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def save(self, step: int, model, optimizer, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        self.wait()  # one write at a time: the previous one is finished (and renamed) first
        t0 = time.time()
        name = f"checkpoint-{step}"
        tmp = D.broadcast_object(str(temp_dir_beside(self.run_dir / name)) if self.is_main else None)
        state = {**state, "step": step, "optimizer_state": self.with_optimizer}
        sd = _state_dicts(model, optimizer, self.trainable_only, self.with_optimizer)
        error = None
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                if self.background:
                    future = dcp.async_save(sd, checkpoint_id=tmp, process_group=self._cpu_group())
                    self.pending = (future, tmp, step, state, t0)
                    LOG.info(f"{name}: copied to CPU memory in {time.time() - t0:.1f}s; writing it in the background")
                    return
                dcp.save(sd, checkpoint_id=tmp)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001  DCP's CheckpointException (a BaseException) wraps each rank's error
                error = describe_failure(e)
        self._finish(tmp, step, state, t0, error)

    def wait(self) -> None:
        """Finish the background write in flight, if any (collective)."""
        if self.pending is None:
            return
        future, tmp, step, state, t0 = self.pending
        self.pending = None
        error = None
        try:
            future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            error = describe_failure(e)
        self._finish(tmp, step, state, t0, error)

    def _finish(self, tmp: str, step: int, state: dict, t0: float, error: str | None) -> None:
        errors = [error] if not dist.is_initialized() else [None] * dist.get_world_size()
        if dist.is_initialized():
            dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
        final = self.run_dir / f"checkpoint-{step}"
        if error is None and self.is_main:
            try:
                (Path(tmp) / STATE).write_text(json.dumps(state, indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                write_text(self.run_dir / LATEST, final.name)
            except OSError as e:
                error = describe_failure(e)
        error = D.broadcast_object(error)
        if error is not None:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(self._failure_message(step, error))
        if self.is_main:
            prune(self.run_dir, self.keep_last)
        D.barrier()
        kind = "" if self.with_optimizer else ", weights only"
        LOG.info(f"saved {final} ({format_bytes(dir_bytes(final)) if self.is_main else '?'}{kind}) in "
                 f"{time.time() - t0:.1f}s{' (written in the background)' if self.background else ''}")

    def _failure_message(self, step: int, error: str) -> str:
        kept = latest_checkpoint(self.run_dir)
        free = shutil.disk_usage(existing_parent(self.run_dir)).free
        size = self.sizes.get("resumable" if self.with_optimizer else "weights")
        need = f"a checkpoint takes {format_bytes(size)}, " if size else ""
        weights = self.sizes.get("weights")
        lighter = (f"set trainer.save_optimizer=false (weights only, {format_bytes(weights)}), " if self.with_optimizer and weights
                   else "")
        return (f"could not save checkpoint-{step} in {self.run_dir}: {error} ({need}{format_bytes(free)} free); "
                f"nothing was half-written, and {'the last good checkpoint ' + kept.name if kept else 'no earlier checkpoint'} "
                f"is kept. Free some space, lower trainer.keep_last (now {self.keep_last}), {lighter}or point "
                f"trainer.default_local_dir at a bigger disk, then "
                f"{'resume with trainer.resume_training=true' if kept else 'start again'}")

    def _cpu_group(self):
        """async_save runs its collectives from a thread, over a CPU backend: a gloo group of its own, so that
        they never interleave with the training's collectives on the default group (also gloo on CPUs)."""
        if not dist.is_initialized():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group


def describe_failure(e: BaseException) -> str:
    """The reason of a failed write in a few words: the OS's words for an OSError (e.g. "No space left on
    device"); DCP's CheckpointException is unwrapped to the first rank's error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    while not isinstance(e, OSError) and isinstance(e.__cause__ or e.__context__, BaseException):
        e = e.__cause__ or e.__context__
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def save_resumable(run_dir: Path, step: int, model, optimizer, state: dict, *, trainable_only: bool, keep_last: int,
                   with_optimizer: bool = True) -> Path:
    """Collective: write one resumable checkpoint in the foreground. Returns the checkpoint directory."""
    Saver(run_dir, trainable_only=trainable_only, keep_last=keep_last, with_optimizer=with_optimizer).save(
        step, model, optimizer, state)
    return Path(run_dir) / f"checkpoint-{step}"


def load_resumable(ckpt: Path, model, optimizer, *, trainable_only: bool) -> dict:
    """Collective: restore model and optimizer in place; returns trainer_state.json. A weights-only checkpoint
    (trainer.save_optimizer=false) restores the model and leaves the optimizer fresh (its moments start at
    zero); the returned state says so with "optimizer_state": false."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    ckpt = Path(ckpt)
    if not (ckpt / STATE).exists():
        raise ValueError(f"'{ckpt}' is not a complete dreamtune checkpoint (no {STATE}); point trainer.resume_path at a checkpoint-STEP directory")
    state = json.loads((ckpt / STATE).read_text())
    with_optimizer = state.get("optimizer_state", True)
    sd = _state_dicts(model, optimizer, trainable_only, with_optimizer)
    msd = sd["model"]
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
    options = _dcp_options(trainable_only=trainable_only, strict=not trainable_only)
    if with_optimizer:
        result = set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=sd["optim"], options=options)
    else:
        result = set_model_state_dict(model, msd, options=options)
    missing = [k for k in getattr(result, "missing_keys", []) if k in msd]
    if missing:
        raise ValueError(f"'{ckpt}' lacks {len(missing)} trainable tensors (e.g. {missing[0]}): it was written with "
                         f"another model or LoRA setting; resume with the settings it was trained with")
    return state


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
