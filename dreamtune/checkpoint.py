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
state. Before step 1, `preflight` sizes the run's checkpoints and checks them against the free disk.

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


# ----------------------------------------------------------------------------------------------- sizes and disk


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
