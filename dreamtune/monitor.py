"""Training monitoring: the console progress bar, `train.log`, `metrics.jsonl`, TensorBoard and W&B.

Only rank 0 writes. W&B never blocks a run: without credentials `online` falls back to `offline`
(sync later with `wandb sync RUN/wandb/...`), and any W&B failure downgrades to a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

LOG = logging.getLogger("dreamtune")

# Dense bf16 peak of one H100 SXM / H200 (NVIDIA's datasheet figure without sparsity), in TFLOP/s.
H100_H200_BF16_TFLOPS = 989.5


def peak_flops(cfg, dev) -> float | None:
    """The FLOP/s that MFU is measured against: trainer.peak_tflops per device if set, else the H100/H200
    figure when training in bf16 on one of those; None otherwise (on the CPU, other GPUs): MFU is not logged."""
    per_device = cfg.trainer.peak_tflops
    if per_device is None and dev.device.type == "cuda" and cfg.model.dtype == "bf16":
        import torch

        name = torch.cuda.get_device_name(dev.device)
        if "H200" in name or ("H100" in name and "PCIe" not in name and "NVL" not in name):
            per_device = H100_H200_BF16_TFLOPS
        else:
            LOG.info(f"MFU is not logged: the peak FLOP/s of a {name} is not known here; set trainer.peak_tflops")
    return None if per_device is None else per_device * 1e12 * dev.world


def flop_counter(model, lora: bool):
    """batch -> the model FLOPs of one training micro-batch, the MFU convention (no recomputation counted):
    6 N per token (forward 2N, backward 4N; 4 N with LoRA, whose frozen weights get no weight gradient),
    N = every parameter (embeddings and head included, as bench/train_step.py counts), plus the attention,
    12 x layers x hidden per pair of positions that attend to each other (QK^T and AV, forward and backward):
    every position of a padded row, the attended ones with left padding, each document of a packed row."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(p.numel() for p in model.parameters())
    per_token = (4 if lora else 6) * n
    per_pair = 12 * inner.config.num_hidden_layers * inner.config.hidden_size

    def count(batch) -> float:
        docs = batch.doc_ids[batch.doc_ids >= 0]
        pairs = float((torch.bincount(docs).double() ** 2).sum()) if docs.numel() else 0.0
        return per_token * float(docs.numel()) + per_pair * pairs

    return count


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Console (stderr) on rank 0, plus RUN/train.log once the run directory exists."""
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if is_main else logging.ERROR)  # one voice: rank 0 speaks
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(console)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOG.addHandler(fh)


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Monitor:
    """Fan-out of step metrics to every configured sink."""

    def __init__(self, run_dir: Path, cfg, total_steps: int, is_main: bool, start_step: int = 0):
        self.is_main = is_main
        self.total = total_steps
        self.run_dir = Path(run_dir)
        self.tb = self.wandb = self.bar = None
        self.t0 = time.time()
        self.start_step = start_step
        self.every = cfg.trainer.log_steps if cfg.trainer.log_steps > 0 else max(1, total_steps // 100)
        if not is_main:
            return
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        loggers = list(cfg.trainer.logger)
        # TensorBoard is cheap and `tensorboard --logdir RUN/tensorboard` is how runs are watched: always on when installed.
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:
            if "tensorboard" in loggers:
                LOG.warning("tensorboard is not installed (pip install 'dreamtune[logging]'); skipping TensorBoard")
        if "wandb" in loggers and cfg.trainer.wandb_mode != "disabled":
            self.wandb = self._start_wandb(cfg)
        if "console" in loggers:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            disable=None if sys.stderr.isatty() else True)

    def _start_wandb(self, cfg):
        try:
            import wandb
        except ImportError:
            LOG.warning("wandb is not installed (pip install 'dreamtune[logging]'); skipping W&B")
            return None
        mode = cfg.trainer.wandb_mode
        if mode == "online" and not _wandb_credentials():
            mode = "offline"
            LOG.info("W&B: no credentials (WANDB_API_KEY or `wandb login`); logging offline under RUN/wandb, "
                     "upload later with `wandb sync`")
        try:
            from omegaconf import OmegaConf

            return wandb.init(project=cfg.trainer.project_name, name=cfg.trainer.experiment_name, dir=str(self.run_dir),
                              mode=mode, config=OmegaConf.to_container(cfg, resolve=True), resume="allow",
                              settings=wandb.Settings(init_timeout=60, silent=True))
        except Exception as e:  # network trouble must never stop training
            LOG.warning(f"W&B could not start ({type(e).__name__}: {e}); continuing without it")
            return None

    def log(self, step: int, row: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **row, "time_s": round(time.time() - self.t0, 3)}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step",)}
        if self.tb is not None:
            for k, v in scalars.items():
                tag = "val/loss" if k == "val_loss" else f"train/{k}"
                self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({("val/loss" if k == "val_loss" else f"train/{k}"): v for k, v in scalars.items()}, step=step)
        if "loss" in row and self.bar is not None:  # the live bar (a terminal only): every step
            self.bar.n = step
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}",
                                 tok_s=f"{row.get('tokens_per_s', 0):,.0f}", refresh=True)
        if "loss" in row and (step % self.every == 0 or step in (1, self.total)):
            eta = self._eta(step)
            mfu = f" | MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""
            line = (f"step {step}/{self.total} | loss {row['loss']:.4f} | lr {row.get('lr', 0):.3g} | "
                    f"grad {row.get('grad_norm', float('nan')):.3g} | {row.get('tokens_per_s', 0):,.0f} tok/s{mfu} | eta {eta}")
            # the progress bar is for a terminal; the log lines are for train.log and captured consoles
            for h in LOG.handlers:
                if isinstance(h, logging.FileHandler) or self.bar is None or self.bar.disable:
                    h.handle(LOG.makeRecord(LOG.name, logging.INFO, __file__, 0, line, None, None))
        if "val_loss" in row:
            LOG.info(f"step {step} | val_loss {row['val_loss']:.4f}")

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        rest = (time.time() - self.t0) / done * (self.total - step)
        if not math.isfinite(rest):
            return "?"
        h, m = divmod(int(rest) // 60, 60)
        return f"{h:d}:{m:02d}:{int(rest) % 60:02d}"

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
        self.metrics.close()
