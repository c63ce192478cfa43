"""Training configuration: OmegaConf structured dataclasses, YAML recipes and dotted key=value overrides.

Every key of the upstream Dream trainer (DreamLM/Dream, src/trainer) is accepted, plus dreamtune's own.
Two keys that Dream launch lines in circulation write, and the upstream trainer does not have, are
accepted as aliases:

    data.enable_perbatch_cutoff -> data.perbatch_cutoff
    trainer.save_freq           -> trainer.save_checkpoint_steps

Hydra's `+key=value` (add a key) is accepted for known keys. An unknown key or a bad value is a
ValueError with one line naming the key and the nearest valid one.

    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-4", "trainer.logger=['console','wandb']"])
"""

from __future__ import annotations

import difflib
import re
import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamtune.grpo_config import PROMPT_FORMATS, SAMPLER_ALGS, GRPOConfig, check_grpo

ALIASES = {
    "data.enable_perbatch_cutoff": "data.perbatch_cutoff",
    "trainer.save_freq": "trainer.save_checkpoint_steps",
}
# Keys whose value must be one of a fixed set (checked after overrides, with the valid set in the message).
CHOICES = {
    "data.truncation": ("error", "left", "right", "drop"),
    "data.perbatch_cutoff_type": ("random", "random_with_input_pad", "strip_padding"),
    "diffusion.time_reweighting": ("original", "linear", "cart", "none"),
    "diffusion.objective": ("dream", "llada"),
    "model.dtype": ("bf16", "fp32"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention", "auto"),
    "trainer.wandb_mode": ("online", "offline", "disabled"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "optim.state_dtype": ("float32", "bfloat16"),
    "trainer.stage": ("sft", "grpo"),
    "grpo.prompt_format": PROMPT_FORMATS,
    "grpo.alg": SAMPLER_ALGS,
}
LOGGERS = ("console", "tensorboard", "wandb")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["data/s1k_dream_format/train.parquet"])
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    response_key: str = "response"
    max_length: int = 2048  # prompt + response tokens per row (Dream's context)
    truncation: str = "error"  # error | left (cut the prompt's start) | right (cut the response's end) | drop
    train_batch_size: int = 16  # global, in rows (s1's recipe); upstream default 256 gives 9 steps on s1K
    micro_batch_size_per_gpu: int = 1
    # group each global batch's rows into micro-batches of at most this many (padded) tokens instead of a fixed
    # row count: short rows share a forward pass; every row still weighs 1/train_batch_size (docs/design.md)
    micro_batch_tokens: Optional[int] = None
    perbatch_cutoff: bool = False
    perbatch_cutoff_type: str = "random"  # random | random_with_input_pad | strip_padding
    resp_cutoff_ratio: float = 0.0  # probability of applying the per-batch cutoff to a batch
    tokenized: bool = False  # accepted for compatibility; rows are always tokenized on the fly
    pad_token_id: Optional[int] = None  # default: the tokenizer's pad (= eos for Dream)
    packing: bool = False  # several rows per sequence with document-masked attention
    val_batches: int = 8  # micro batches of validation per evaluation (fixed masks)
    shuffle: bool = True


@dataclass
class FSDPConfig:
    cpu_offload: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True


@dataclass
class ModelConfig:
    partial_pretrain: str = "Dream-org/Dream-v0-Base-7B"  # a hub id or a local directory
    trust_remote_code: bool = False  # accepted and ignored: dreamtune never runs remote code
    enable_gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1  # with checkpointing on: 1 = every layer, 2 = every other (faster, more memory)
    lora_rank: int = 0  # 0 = full fine-tune
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    dtype: str = "bf16"  # compute dtype on GPU (weights and optimizer stay fp32); CPU always runs fp32
    attn_implementation: str = "sdpa"
    compile: bool = False  # torch.compile each decoder layer (GPU)
    offload_embeddings: bool = False  # LoRA on one GPU: the frozen input embeddings stay in CPU memory (1 GiB for 7B)
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    warmup_steps_ratio: float = 0.1
    clip_grad: float = 1.0
    lr_scheduler: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    # AdamW moments: float32 (torch's fused AdamW) or bfloat16 (dreamtune.optim: 8 bytes/param less, fp32 maths)
    state_dtype: str = "float32"


@dataclass
class DiffusionConfig:
    time_reweighting: str = "original"  # original (1/t) | linear (1-t) | cart | none
    cart_p: float = 0.1
    token_reweighting: bool = False  # focal term alpha * (1 - e^-CE)^gamma * CE
    alpha: float = 0.25
    gamma: float = 2.0
    t_eps: float = 0.0  # floor on t: p = (1 - eps) t + eps (Dream: 0; LLaDA/d1: 1e-3)
    # dream: the weights above, normalised by the masked count; llada: LLaDA's SFT objective (t_eps 1e-3,
    # 1/p weights, each sequence normalised by its answer length incl. trailing eos padding)
    objective: str = "dream"


@dataclass
class TrainerConfig:
    default_local_dir: str = "runs/dream-sft"
    default_hdfs_dir: Optional[str] = None  # accepted; dreamtune writes local files only
    resume_path: Optional[str] = None
    resume_training: bool = False
    project_name: str = "dreamtune"
    experiment_name: str = "sft"
    total_epochs: int = 3
    total_training_steps: Optional[int] = None
    logger: list[str] = field(default_factory=lambda: ["console"])
    wandb_mode: str = "online"  # online | offline | disabled; online falls back to offline without network
    seed: int = 42
    save_checkpoint_steps: int = 1000
    keep_last: int = 2  # resumable checkpoints kept (0 = all); one more exists while the newest is written
    save_optimizer: bool = True  # false: resumable checkpoints hold the weights only (resume restarts AdamW's moments)
    async_save: bool = False  # write checkpoints in the background (the state is copied to CPU memory first)
    check_disk: bool = True  # false: no pre-flight disk check (a filesystem that misreports its free space)
    val_check_steps: int = 50  # validation cadence in optimizer steps (0 = only at the end)
    log_steps: int = 0  # console/train.log line every N steps (0: about 100 lines a run); metrics.jsonl gets every step
    export_dream: bool = False  # also write checkpoint-final-dream in Dream's format
    device: str = "auto"  # auto | cpu | cuda
    max_steps_this_run: Optional[int] = None  # stop (after saving) once this many steps ran in this process
    stage: str = "sft"  # sft (masked-diffusion SFT) | grpo (reinforcement learning after SFT: the grpo.* keys)
    peak_tflops: Optional[float] = None  # per device, for MFU; default: 989.5 on an H100/H200 in bf16, else no MFU


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


# ----------------------------------------------------------------------------------------------- keys


def valid_keys(cls=TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key (dotted) -> its dataclass field type."""
    out = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            out.update(valid_keys(type(default), key + "."))
        else:
            out[key] = f.type
    return out


def _nearest(key: str, keys) -> str:
    near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
    if not near:  # compare the last component too: "data.max_lenght" -> "data.max_length"
        last = key.split(".")[-1]
        by_last = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
        near = [by_last[m[0]]] if m else []
    return f"; did you mean '{near[0]}'?" if near else ""


def canonical_key(key: str) -> str:
    """Strip Hydra's + / ++ prefixes, apply aliases, and check the key exists."""
    key = key.lstrip("+").strip()
    key = ALIASES.get(key, key)
    keys = valid_keys()
    if key not in keys:
        # a whole section (e.g. model.fsdp_config) cannot be set with one value
        raise ValueError(f"unknown config key '{key}'{_nearest(key, list(keys) + list(ALIASES))}")
    return key


def parse_value(raw: str) -> Any:
    """YAML scalars and flow lists: 2e-6, True, null, ['console','wandb']. Unparseable text stays a string."""
    try:
        return yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        return raw


def _coerce(key: str, value: Any) -> Any:
    tp = str(valid_keys()[key])  # annotations are strings here (from __future__ import annotations)
    # YAML 1.1 reads 2e-6 as a string (no dot in the mantissa): floats are parsed again here.
    if tp in ("float", "Optional[float]") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp.startswith("list") and value is not None and not isinstance(value, (list, tuple)):
        if isinstance(value, str) and "," in value and not value.startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [value]
    return value


def apply_overrides(cfg, overrides: list[str]):
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value (e.g. optim.lr=1e-5)")
        raw_key, raw_value = item.split("=", 1)
        key = canonical_key(raw_key)
        value = _coerce(key, parse_value(raw_value))
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            raise ValueError(f"bad value for '{key}': {raw_value!r} ({msg})") from None
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in valid_keys():
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None):
    """The structured defaults, then the YAML recipe (if any), then the overrides; validated."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise IsADirectoryError(f"config file '{p}' is a directory; pass a YAML file (see configs/ for recipes)")
        if not p.is_file():
            raise FileNotFoundError(f"config file '{p}' not found; see configs/ for recipes")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not UTF-8 text, so not YAML; pass a YAML recipe (see configs/)") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a mapping of sections (data:, model:, ...)")
        apply_overrides(cfg, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                              for k, v in _flatten(data).items()])
    apply_overrides(cfg, list(overrides or []))
    check_values(cfg)
    return cfg


def check_values(cfg) -> None:
    """Values that type checks cannot catch: choices, ranges, loggers."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"bad value for '{key}': '{value}' (choose one of {', '.join(choices)}){hint}")
    for name in cfg.trainer.logger:
        if name not in LOGGERS:
            raise ValueError(f"bad value for 'trainer.logger': '{name}' (choose from {', '.join(LOGGERS)})")
    positive = ["model.checkpoint_every_n_layers", "data.max_length", "data.train_batch_size", "data.micro_batch_size_per_gpu", "trainer.total_epochs",
                "trainer.save_checkpoint_steps"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ValueError(f"bad value for '{key}': {OmegaConf.select(cfg, key)} (must be > 0)")
    ranges = {"optim.lr": (0.0, 1.0), "optim.warmup_steps_ratio": (0.0, 1.0), "diffusion.cart_p": (0.0, 1.0),
              "data.resp_cutoff_ratio": (0.0, 1.0), "diffusion.t_eps": (0.0, 1.0), "optim.weight_decay": (0.0, 10.0)}
    for key, (lo, hi) in ranges.items():
        v = OmegaConf.select(cfg, key)
        if not lo <= v <= hi:
            raise ValueError(f"bad value for '{key}': {v} (must lie in [{lo}, {hi}])")
    if cfg.diffusion.time_reweighting == "cart" and not 0 < cfg.diffusion.cart_p < 1:
        raise ValueError(f"bad value for 'diffusion.cart_p': {cfg.diffusion.cart_p} (must lie in (0, 1) for cart)")
    if cfg.diffusion.objective == "llada" and (cfg.diffusion.time_reweighting != "original" or cfg.diffusion.t_eps not in (0.0, 1e-3)):
        raise ValueError("diffusion.objective=llada is LLaDA's objective, with its own weights (1/p) and t_eps (1e-3); "
                         "leave diffusion.time_reweighting and diffusion.t_eps at their defaults")
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"bad value for 'optim.betas': {list(cfg.optim.betas)} (two numbers, e.g. [0.9,0.95])")
    if cfg.optim.state_dtype == "bfloat16":
        import torch

        from dreamtune.optim import check_betas

        check_betas(list(cfg.optim.betas), torch.bfloat16)
    if cfg.model.lora_rank < 0:
        raise ValueError(f"bad value for 'model.lora_rank': {cfg.model.lora_rank} (0 = off, or a positive rank)")
    if cfg.model.offload_embeddings and cfg.model.lora_rank == 0:
        raise ValueError("model.offload_embeddings=true keeps a frozen embedding table in CPU memory; it needs LoRA "
                         "(set model.lora_rank, e.g. 16) or model.offload_embeddings=false")
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty; set data.train_files=path/to/train.parquet")
    if cfg.trainer.keep_last < 0:
        raise ValueError(f"bad value for 'trainer.keep_last': {cfg.trainer.keep_last} (0 = keep all, or a positive count)")
    if cfg.trainer.peak_tflops is not None and cfg.trainer.peak_tflops <= 0:
        raise ValueError(f"bad value for 'trainer.peak_tflops': {cfg.trainer.peak_tflops} (the accelerator's peak in "
                         f"TFLOP/s, e.g. 989.5 for an H100/H200 in bf16, or null)")
    if cfg.trainer.total_training_steps is not None and cfg.trainer.total_training_steps <= 0:
        raise ValueError("bad value for 'trainer.total_training_steps': must be > 0 (or null for epochs)")
    if cfg.data.micro_batch_tokens is not None:
        if cfg.data.micro_batch_tokens < cfg.data.max_length:
            raise ValueError(f"bad value for 'data.micro_batch_tokens': {cfg.data.micro_batch_tokens} (at least "
                             f"data.max_length={cfg.data.max_length}, so that any row fits, or null)")
        if cfg.data.micro_batch_size_per_gpu != 1:
            raise ValueError("data.micro_batch_tokens sizes the micro-batches by tokens; leave data.micro_batch_size_per_gpu "
                             f"at 1 (it is {cfg.data.micro_batch_size_per_gpu}) or set data.micro_batch_tokens=null")
    if cfg.data.packing and cfg.data.perbatch_cutoff:
        raise ValueError("data.packing and data.perbatch_cutoff cannot both be on; packing removes padding already")
    if cfg.trainer.stage == "grpo":
        check_grpo(cfg)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """`[config.yaml] key=value ... --flag ...` -> (config path, overrides, flags)."""
    path, overrides, flags = None, [], []
    for a in argv:
        if a.startswith("--"):
            flags.append(a)
        elif "=" in a and not re.match(r"^[\w./-]+\.(ya?ml)$", a):
            overrides.append(a)
        elif path is None and a.endswith((".yaml", ".yml")):
            path = a
        else:
            raise ValueError(f"unexpected argument '{a}': give an optional config.yaml, then key=value overrides")
    return path, overrides, flags
