"""AdamW whose two moments are stored in bfloat16 (`optim.state_dtype=bfloat16`): 8 bytes less per parameter.

A full fine-tune of a 7.6B model with fp32 weights, gradients and fp32 AdamW moments needs 16 bytes per
parameter, 122 GB, before any activation: more than the 100 GB the one-GPU recipe aims at. Stored in bf16,
the moments take 15 GB less each; the update itself runs in fp32 (each moment is read, updated in fp32 and
rounded back), as DeepSeek-V3 trains (its report: "BF16 ... to track the first and second moments in the
AdamW optimizer, without incurring observable performance degradation"). The arithmetic is torch.optim.AdamW's
(decoupled weight decay, bias corrections, eps added after the square root); with state_dtype=float32 it
matches torch's AdamW (tested). On a GPU the per-parameter update is one torch.compile'd kernel.

Gradient clipping is folded into that kernel: `step(grad_scale=clip_coefficient(norm, max_norm))` scales each
gradient as it is read, instead of a separate pass that reads and writes every fp32 gradient (30 GB each
way for a 7.6B model, ~15 ms of an H200 step) as `torch.nn.utils.clip_grad_norm_` does.
"""

from __future__ import annotations

import warnings

import torch


def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad_scale: torch.Tensor,
                  lr: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """One AdamW update of p in place (fp32 maths; m and v are read and written back in their own dtype).
    grad_scale (the clipping coefficient), lr, step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t):
    0-dim fp32 tensors (no recompiles)."""
    g = g.float() * grad_scale
    m32 = m.float().lerp_(g, 1 - beta1)
    v32 = v.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.mul_(1 - lr * weight_decay)
    p.add_(-step_size * m32 / (v32.sqrt() / bc2_sqrt + eps))
    m.copy_(m32)
    v.copy_(v32)


MAX_BF16_BETA = 0.995  # bf16 keeps 8 significant bits: v * beta rounds back to v once 1 - beta < ~2^-8


def check_betas(betas, state_dtype) -> None:
    """bf16 moments cannot decay with a beta this close to 1 (x * 0.999 rounds to x in bf16): the second
    moment would only grow and the steps shrink silently. A ValueError says what to do instead."""
    if state_dtype == torch.bfloat16 and max(betas) > MAX_BF16_BETA:
        raise ValueError(f"optim.betas {list(betas)} with optim.state_dtype=bfloat16: a beta above {MAX_BF16_BETA} "
                         f"cannot decay a bf16 moment; use betas <= {MAX_BF16_BETA} (Dream: [0.9, 0.95]) or "
                         f"optim.state_dtype=float32")


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies the gradients by: min(1, max_norm / (norm + 1e-6))."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


CHUNK = 1 << 24  # elements per eager update: its fp32 temporaries stay ~64 MB each, not 2 GB for an embedding


def adamw_update_chunked_(p, g, m, v, *rest) -> None:
    """adamw_update_ over slices of CHUNK elements (the eager path: its temporaries are per slice)."""
    tensors = (p, g, m, v)
    if p.numel() <= CHUNK or not all(t.is_contiguous() for t in tensors):
        return adamw_update_(p, g, m, v, *rest)
    flat = [t.view(-1) for t in tensors]
    for s in range(0, p.numel(), CHUNK):
        adamw_update_(*(t[s:s + CHUNK] for t in flat), *rest)


FOREACH_MAX = 1 << 22  # parameters up to this many elements (a 7B model's k/v projections) go to adamw_foreach_


def adamw_foreach_(ps: list, gs: list, ms: list, vs: list, grad_scale, lr, step_size, bc2_sqrt, beta1: float,
                   beta2: float, eps: float, weight_decay: float) -> None:
    """adamw_update_ over lists of tensors with torch._foreach ops: the same arithmetic in the same order (equal
    to the eager per-tensor update, tested; the compiled one on a GPU may fuse differently in the last bit),
    a few kernels for the whole list instead of one call per tensor."""
    g = torch._foreach_mul([x.float() for x in gs], grad_scale)
    m32 = [x.float() for x in ms]  # with float32 state these are the state tensors themselves, updated in place
    v32 = [x.float() for x in vs]
    torch._foreach_lerp_(m32, g, 1 - beta1)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g, g, value=1 - beta2)
    torch._foreach_mul_(ps, 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(v32)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(m32, -step_size)
    torch._foreach_div_(update, denom)
    torch._foreach_add_(ps, update)
    if m32[0] is not ms[0]:  # bf16 moments: round the float32 results back into the state
        torch._foreach_copy_(ms, m32)
        torch._foreach_copy_(vs, v32)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (same storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the moments kept in `state_dtype` (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.01,
                 state_dtype: torch.dtype = torch.bfloat16):
        check_betas(betas, state_dtype)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self._update = None

    def _kernel(self, device: torch.device):
        if self._update is None:
            self._update = adamw_update_chunked_
            if device.type == "cuda":  # one fused kernel per parameter instead of ~10 (the optimizer is memory-bound)
                self._update = torch.compile(adamw_update_, dynamic=True)
        return self._update

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's Optimizer.load_state_dict casts every floating state to its parameter's dtype: fp32 moments
        on resume, and for a moment twice the memory. This keeps them in state_dtype, on the parameter's device."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                        for a, b in zip(saved, self.param_groups)):
            raise ValueError("the optimizer state does not match the model's parameters (a different model or LoRA setting?)")
        by_id = {}
        for old, group in zip(saved, self.param_groups):
            by_id.update(zip(old["params"], group["params"]))
            group.update({k: v for k, v in old.items() if k != "params"})
        self.state.clear()
        for pid, st in state_dict["state"].items():
            p = by_id[pid]
            # the step on the CPU as a float (a fused torch AdamW keeps it on the GPU: .item() would sync)
            self.state[p] = {k: (torch.as_tensor(v, dtype=torch.float32).cpu() if k == "step"
                                 else v.to(device=p.device, dtype=self.state_dtype)) for k, v in st.items()}

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        """One update; grad_scale (a 0-dim tensor, e.g. clip_coefficient(...)) multiplies every gradient.
        Large parameters get one kernel each; small ones (norms, biases, LoRA adapters: hundreds of
        tensors) are updated together by torch._foreach ops, since a kernel call per tensor costs ~0.1 ms
        of Python and launch overhead: 60 ms a step for LoRA's 392 adapter matrices."""
        assert closure is None, "closures are not supported"
        scale_at = {}  # device -> grad_scale there, as a 0-dim fp32 tensor
        small = {}  # (device, group index, step) -> ([[p], [g], [m], [v]], (scalars..., hyper...), [elements])
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            hyper = (beta1, beta2, group["eps"], group["weight_decay"])
            scalars_at = {}  # (step, device) -> [lr, lr / (1 - beta1^t), sqrt(1 - beta2^t)] on the device, made once
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = state["step"].item()
                pl = _local(p)
                if (t, pl.device) not in scalars_at:
                    scalars_at[t, pl.device] = [torch.tensor(x, dtype=torch.float32, device=pl.device) for x in
                                                (group["lr"], group["lr"] / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5)]
                if pl.device not in scale_at:
                    scale_at[pl.device] = (torch.ones((), device=pl.device) if grad_scale is None else
                                           torch.as_tensor(grad_scale).detach().to(device=pl.device,
                                                                                   dtype=torch.float32).reshape(()))
                scalars = [scale_at[pl.device], *scalars_at[t, pl.device]]
                tensors = [pl, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"])]
                if pl.numel() <= FOREACH_MAX:
                    key = (pl.device, gi, t)  # one batch shares its group's lr and its step's bias corrections
                    lists, _, total = small.setdefault(key, ([[], [], [], []], (*scalars, *hyper), [0]))
                    for lst, x in zip(lists, tensors):
                        lst.append(x)
                    total[0] += pl.numel()
                    if total[0] >= CHUNK:  # bound the float32 temporaries of a batch (< CHUNK + FOREACH_MAX elements)
                        adamw_foreach_(*lists, *scalars, *hyper)
                        del small[key]
                    continue
                if all(x.is_contiguous() for x in tensors):  # 1-D views: one compiled kernel serves every shape
                    tensors = [x.view(-1) for x in tensors]
                args = (*tensors, *scalars, *hyper)
                try:
                    self._kernel(pl.device)(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001  a compiler missing on this machine: same maths, eagerly
                    if self._update is adamw_update_chunked_:
                        raise
                    warnings.warn(f"compiled AdamW update failed ({type(e).__name__}: {e}); running it eagerly",
                                  stacklevel=2)
                    self._update = adamw_update_chunked_
                    adamw_update_chunked_(*args)
        for lists, rest, _ in small.values():
            adamw_foreach_(*lists, *rest)
        return None
