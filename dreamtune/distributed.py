"""Process-group set-up and FSDP2, applied as a thin layer over single-device model code.

One process (plain `python -m dreamtune.train`) runs without a process group. Under torchrun the group
uses NCCL on GPUs and gloo on CPUs (so the distributed path is tested on CPU).

`apply_fsdp` shards each decoder layer, then the decoder (embeddings, final norm) and the output head
separately, then the root: the training code calls the decoder and the head directly (to project only
masked positions through the vocabulary), so each must own its parameters' all-gather.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()


def init(device_pref: str = "auto") -> Dist:
    """Initialise from torchrun's environment, or a single process without a group."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=torch.device("cuda", local) if use_cuda else None)
    return Dist(rank, world, local, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def apply_activation_checkpointing(model: torch.nn.Module, every: int = 1) -> None:
    """Recompute activations in the backward pass for every `every`-th decoder layer (transformers' own
    per-layer checkpointing, non-reentrant). every=1 saves the most memory; 2 recomputes half the layers."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(hf, "activation_checkpointing_enable"):  # the newer transformers name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 5.17 (the GPU image)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(hf.get_decoder().layers):
        layer.gradient_checkpointing = i % every == 0


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer (same code, fused kernels); the layers share one compiled graph."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in hf.get_decoder().layers:
        layer.compile()


def check_embeddings_untied(model: torch.nn.Module) -> None:
    """model.offload_embeddings needs an input table of its own: a tied output head needs it on the GPU."""
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        raise ValueError("model.offload_embeddings=true: this model ties its input and output embeddings and the "
                         "output head needs the table on the GPU; set model.offload_embeddings=false")


def offload_input_embeddings(model: torch.nn.Module) -> None:
    """Keep a frozen input-embedding table in CPU memory and look tokens up there (LoRA on a small GPU:
    Dream-7B's 152k x 3584 bf16 table is 1.0 GiB). Call after the model is on its device: the ids go to
    the CPU, the [B, L, H] embeddings (29 MB at 2 x 2048) come back. State-dict keys are unchanged."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = hf.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or any(p.requires_grad for p in emb.parameters()):
        raise ValueError("model.offload_embeddings=true needs a frozen, plain embedding table: use it with LoRA "
                         "(model.lora_rank > 0) whose target_modules leave out embed_tokens, or set "
                         "model.offload_embeddings=false")
    check_embeddings_untied(hf)
    device = emb.weight.device
    emb.to("cpu")
    emb.register_forward_pre_hook(lambda _m, args: (args[0].cpu(), *args[1:]))
    emb.register_forward_hook(lambda _m, _args, out: out.to(device))


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype | None, reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2 over a transformers *ForCausalLM (possibly inside a peft wrapper). fp32 master weights and
    fp32 gradient reduction; `param_dtype` (bf16 on GPU) is the compute dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> the HF model
    decoder = hf.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, **kw)
    fully_shard(decoder, **kw)
    fully_shard(hf.get_output_embeddings(), **kw)
    fully_shard(model, **kw)
    return model
