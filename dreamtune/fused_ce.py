"""The chunked cross-entropy, in two forms sharing one log-sum-exp, one softmax gradient and one focal term:
`masked_ce` over logits (a trained head), and `weighted_linear_ce`, linear + cross-entropy fused by chunks
(a frozen head).

Fused: the loss of `h @ W.T` against targets without keeping the [N, V] logits for the backward pass (V = 152k for Dream: at N = 2048 masked positions the float32
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


def focal_term(ce: torch.Tensor, focal: tuple[float, float]) -> torch.Tensor:
    """Dream's focal reweighting of a per-token cross-entropy: alpha (1 - e^-ce)^gamma ce."""
    alpha, gamma = focal
    return alpha * (1 - torch.exp(-ce)) ** gamma * ce


def _focal_value_and_slope(ce: torch.Tensor, focal: tuple[float, float] | None):
    """f(ce) and f'(ce) for f = identity or focal_term."""
    if focal is None:
        return ce, torch.ones_like(ce)
    alpha, gamma = focal
    q = 1 - torch.exp(-ce)  # in [0, 1)
    df = alpha * (gamma * q.clamp(min=1e-12) ** (gamma - 1) * torch.exp(-ce) * ce + q ** gamma)
    return focal_term(ce, focal), df


def _lse_ce_(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp [c], cross-entropy [c]) of float32 logits x [c, V] against targets [c]. x is overwritten:
    the log-sum-exp runs in place, one float32 [c, V] buffer alive, not three (torch.logsumexp's temporaries)."""
    target_logit = x.gather(1, targets[:, None])[:, 0]
    top = x.amax(-1)  # [c]
    lse = x.sub_(top[:, None]).exp_().sum(-1).log_() + top
    return lse, lse - target_logit


def _softmax_minus_onehot_(x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d CE / d logits for float32 logits x [c, V], in place: softmax (from the forward's log-sum-exp) - onehot."""
    x.sub_(lse[:, None]).exp_()
    x[torch.arange(x.shape[0], device=x.device), targets] -= 1
    return x


class _ChunkedCE(torch.autograd.Function):
    """Cross-entropy of logits [N, V] against targets [N], in float32 by chunks of rows. It keeps the
    logits in their own dtype (bf16 on a GPU) and a float32 log-sum-exp per row for the backward, where
    F.cross_entropy on a float32 copy would keep a float32 [N, V] log-softmax: for Dream's 152k vocabulary
    at 4,096 masked positions, 1.25 GB of bf16 logits kept instead of a 2.5 GB float32 log-softmax, and one
    float32 chunk alive at a time."""

    @staticmethod
    def forward(ctx, logits, targets, chunk):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        ce = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].to(torch.float32, copy=True)  # [c, V], a copy: changed in place below
            lse[s:s + chunk], ce[s:s + chunk] = _lse_ce_(x, targets[s:s + chunk])
            del x
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            g = logits[s:s + ctx.chunk].to(torch.float32, copy=True)  # [c, V]
            g = _softmax_minus_onehot_(g, lse[s:s + ctx.chunk], targets[s:s + ctx.chunk])
            grad[s:s + ctx.chunk] = g.mul_(grad_ce[s:s + ctx.chunk, None])
        return grad, None, None


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy [N] in float32 of logits [N, V] (any float dtype), by chunks of rows."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32) + logits.sum() * 0
    return _ChunkedCE.apply(logits, targets, chunk)


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
            lse[s:s + chunk], ce[s:s + chunk] = _lse_ce_(logits, targets[s:s + chunk])
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
            g = _softmax_minus_onehot_((hc @ w.T).float(), lse[s:s + ctx.chunk], targets[s:s + ctx.chunk])  # [c, V]
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
