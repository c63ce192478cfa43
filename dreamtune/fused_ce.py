"""Linear + cross-entropy fused by chunks: the loss of `h @ W.T` against targets without keeping the
[N, V] logits for the backward pass (V = 152k for Dream: at N = 2048 masked positions the float32
logits, their bf16 copy and the softmax gradient take ~7 GiB, more than LoRA's adapters and activations
together). Forward computes each chunk's logits, log-sum-exp and target logit, then drops them; backward
recomputes each chunk's logits and forms the gradient `softmax - onehot` in place.

    loss = weighted_linear_ce(h, W, targets, weights, focal=None)   # = sum_i w_i f(CE_i) / N

The matmuls run in the autocast dtype when autocast is on (bf16 on GPU), the softmax in float32, and
the weight gradient accumulates in W's dtype (float32 master weights). Used for a frozen output head
(LoRA: measured 21.2 -> 17.1 GiB at 2 x 2048 on a 7B model); a trained head goes through its module.
"""

from __future__ import annotations

import torch


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _focal_value_and_slope(ce: torch.Tensor, focal: tuple[float, float] | None):
    """f(ce) and f'(ce) for f = identity or alpha (1 - e^-ce)^gamma ce."""
    if focal is None:
        return ce, torch.ones_like(ce)
    alpha, gamma = focal
    q = 1 - torch.exp(-ce)  # in [0, 1)
    f = alpha * q ** gamma * ce
    df = alpha * (gamma * q.clamp(min=1e-12) ** (gamma - 1) * torch.exp(-ce) * ce + q ** gamma)
    return f, df


class _WeightedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, coef, chunk, focal):
        # h [N, H], weight [V, H], targets [N], coef [N] (per-token weight / N)
        dt = _matmul_dtype(h)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ce = torch.empty_like(lse)
        w = weight.to(dt)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk].to(dt) @ w.T).float()  # [c, V]; the bf16 product is freed here
            target_logit = logits.gather(1, targets[s:s + chunk, None])[:, 0]
            top = logits.amax(-1)  # [c]
            # log-sum-exp in place: one float32 [c, V] buffer alive, not three (torch.logsumexp's temporaries)
            lse[s:s + chunk] = logits.sub_(top[:, None]).exp_().sum(-1).log_() + top
            ce[s:s + chunk] = lse[s:s + chunk] - target_logit
            del logits
        f, df = _focal_value_and_slope(ce, focal)
        ctx.save_for_backward(h, weight, targets, coef * df, lse)
        ctx.chunk = chunk
        ctx.dtype = dt  # backward runs outside autocast: keep the forward's matmul dtype (bf16, not fp32)
        return (f * coef).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        h, weight, targets, slope, lse = ctx.saved_tensors
        dt = ctx.dtype
        w = weight.to(dt)
        dh = torch.empty_like(h)
        dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk].to(dt)
            # softmax from the forward's log-sum-exp, in place in one float32 [c, V] buffer
            g = (hc @ w.T).float().sub_(lse[s:s + ctx.chunk, None]).exp_()  # [c, V]
            g[torch.arange(g.shape[0], device=g.device), targets[s:s + ctx.chunk]] -= 1
            g.mul_((slope[s:s + ctx.chunk] * grad_loss)[:, None])
            g = g.to(dt)
            dh[s:s + ctx.chunk] = (g @ w).to(h.dtype)
            if dw is not None:
                dw += (g.T @ hc).to(dw.dtype)
        return dh, dw, None, None, None, None


def weighted_linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       focal: tuple[float, float] | None = None, chunk: int = 256):
    """(sum_i weights_i f(CE_i) / N, CE [N] detached). h [N, H]; weight [V, H]; targets, weights [N].
    chunk: rows per matmul. 256 keeps a chunk's float32 logits at 156 MB for Dream's vocabulary (the LoRA
    step's peak memory includes it) while the [256, H] x [H, V] product stays compute-bound on a GPU."""
    n = targets.numel()
    if n == 0:
        zero = h.sum() * 0.0 + weight.sum() * 0.0
        return zero, h.new_zeros(0, dtype=torch.float32)
    coef = weights.float() / n
    loss, ce = _WeightedLinearCE.apply(h, weight, targets, coef, chunk, focal)
    return loss, ce.detach()
