"""The masked-diffusion SFT objective, as Dream trains it, in pure functions with explicit generators.

Forward process: one t ~ U(0, 1) per sequence (optionally floored: p = (1 - eps) t + eps); every
maskable token (response tokens and the trailing eos/pad, never the prompt) is replaced by the mask token
independently with probability t.

Loss: cross-entropy at masked positions only (the logits already carry Dream's shift, see
models.DiffusionLM.logits), times a weight, summed and divided by the number of masked tokens in the
micro-batch. Weights (`diffusion.time_reweighting`):
    original  1/t                        linear  1 - t                  none  1
    cart      sum_{j != i} 0.5 p (1-p)^(|i-j|-1) [j unmasked]   (Dream paper, section 4.2; no 1/t)
Optional focal term (`diffusion.token_reweighting`): alpha * (1 - e^-CE)^gamma * CE.

`diffusion.objective=llada` is LLaDA's SFT objective instead: p = (1 - 1e-3) t + 1e-3, and
    loss = 1/D * sum_d sum_{i masked in d} CE_i / (p_d * len_d)
over the D sequences of the micro-batch, len_d = sequence d's answer length (its maskable tokens: the answer
and its trailing eos padding, which are targets). `llada_weights` expresses it as weights for the same
division by the masked count, so one loss function (and the fused LoRA head) serves both.
"""

from __future__ import annotations

import math

import torch

from dreamtune.fused_ce import focal_term, masked_ce, weighted_linear_ce
import torch.nn.functional as F


def sample_t(batch: int, generator: torch.Generator, eps: float = 0.0, device="cpu") -> torch.Tensor:
    """Noise levels [B] in (eps, 1): one per sequence."""
    t = torch.rand(batch, generator=generator, device=device)  # [B]
    return (1 - eps) * t + eps


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, t: torch.Tensor, mask_token_id: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable token by the mask token with probability t of its sequence.

    input_ids, maskable: [B, L]; t: [B] (one per row) or [B, L] (per position: packed rows hold several
    sequences, each with its own t). Returns (noisy_ids [B, L], masked [B, L] bool).
    """
    t_pos = t[:, None].expand(input_ids.shape) if t.dim() == 1 else t  # [B, L]
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # [B, L]
    masked = maskable & (u < t_pos)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def cart_kernel(p: float, length: int, tol: float = 1e-12, device="cpu") -> torch.Tensor:
    """The CART kernel k(d) = 0.5 p (1-p)^(|d|-1) for d != 0, k(0) = 0, truncated where it falls below tol
    (for p = 0.1 that is |d| > 250). Returns [2K+1] with K = min(length - 1, cutoff)."""
    cutoff = length - 1 if p >= 1 else min(length - 1, int(math.ceil(math.log(tol / (0.5 * p)) / math.log(1 - p))) + 1)
    d = torch.arange(-cutoff, cutoff + 1, device=device, dtype=torch.float64).abs()
    k = 0.5 * p * (1 - p) ** (d - 1)
    k[cutoff] = 0.0
    return k


def cart_weights(masked: torch.Tensor, p: float, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Context-adaptive weights [B, L]: for each position i, sum over j != i of k(i-j) [j unmasked].

    Unmasked positions include prompt tokens and left pads (they are context the model sees). Only the
    values at masked positions are used by the loss. Computed as a 1-D convolution (float64 for accuracy).
    doc_ids [B, L] (packed rows): only positions of the same document count as context.
    """
    if doc_ids is not None:
        out = torch.zeros(masked.shape, dtype=torch.float32, device=masked.device)
        for b in range(masked.shape[0]):
            for d in doc_ids[b].unique().tolist():
                if d < 0:
                    continue
                idx = (doc_ids[b] == d).nonzero()[:, 0]
                s, e = int(idx[0]), int(idx[-1]) + 1  # documents are contiguous
                out[b, s:e] = cart_weights(masked[b:b + 1, s:e], p)[0]
        return out
    B, L = masked.shape
    k = cart_kernel(p, L, device=masked.device)  # [2K+1], symmetric so conv == correlation
    unmasked = (~masked).to(torch.float64)[:, None, :]  # [B, 1, L]
    K = (k.numel() - 1) // 2
    w = F.conv1d(unmasked, k.view(1, 1, -1), padding=K)  # [B, 1, L]
    return w[:, 0, :].to(torch.float32)


def time_weights(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Weights for the non-CART reweightings, elementwise in t (any shape)."""
    if kind == "original":
        return 1.0 / t
    if kind == "linear":
        return 1.0 - t
    assert kind == "none", f"unknown time reweighting {kind}"
    return torch.ones_like(t)


def position_weights(t: torch.Tensor, masked: torch.Tensor, kind: str, cart_p: float = 0.1,
                     doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of each masked position, [N] in row-major order of `masked` (matching logits[masked]).
    t: [B] or [B, L] as in mask_tokens."""
    if kind == "cart":
        return cart_weights(masked, cart_p, doc_ids)[masked]
    t_pos = t[:, None].expand(masked.shape) if t.dim() == 1 else t  # [B, L]
    return time_weights(t_pos[masked], kind)


LLADA_EPS = 1e-3  # LLaDA's floor on the masking probability


def llada_weights(t: torch.Tensor, masked: torch.Tensor, maskable: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's per-token weights, [N] in row-major order of `masked`: N / (p_d * len_d * D), so that
    diffusion_loss's sum(CE * w) / N is LLaDA's loss (see the module docstring). t: [B] or [B, L] (already
    floored: p); maskable, doc_ids [B, L] (doc_ids -1 = no sequence)."""
    n_docs = int(doc_ids.max()) + 1
    assert n_docs > 0, "a micro-batch holds at least one sequence"
    lengths = torch.zeros(n_docs, device=doc_ids.device).index_add_(
        0, doc_ids[maskable], torch.ones(int(maskable.sum()), device=doc_ids.device))  # [D] answer lengths
    t_pos = t[:, None].expand(masked.shape) if t.dim() == 1 else t  # [B, L]
    n = masked.sum().to(torch.float32)
    return n / (t_pos[masked] * lengths[doc_ids[masked]] * n_docs)


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, focal: bool = False,
                   alpha: float = 0.25, gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted masked-token loss, normalised by the number of masked tokens.

    logits [N, V] at masked positions (shift applied), targets [N], weights [N].
    Returns (loss, the unweighted mean cross-entropy for logging). With N == 0 the loss is a zero that
    still depends on the logits, so every rank runs the same backward.
    """
    n = targets.numel()
    if n == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    ce = masked_ce(logits, targets)  # [N]
    per_token = focal_term(ce, (alpha, gamma)) if focal else ce
    loss = (per_token * weights.to(ce.dtype)).sum() / n
    return loss, ce.detach().mean()


def head_loss(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
              focal: bool = False, alpha: float = 0.25, gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusion_loss(head(h), ...), without keeping the logits for autograd when the head is a frozen plain
    linear layer (LoRA: dreamtune.fused_ce saves ~4 GiB at 2 x 2048 on Dream-7B). A trained head (full
    fine-tune, where the peak is the optimizer state anyway) and FSDP's sharded head go through the module.
    h [N, H] hidden states at the masked positions (shift applied). Returns (loss, mean CE)."""
    from torch.distributed.tensor import DTensor

    w = getattr(head, "weight", None)
    frozen_plain = (isinstance(head, torch.nn.Linear) and head.bias is None and w is not None
                    and not isinstance(w, DTensor) and not w.requires_grad)
    if not frozen_plain:
        return diffusion_loss(head(h), targets, weights, focal=focal, alpha=alpha, gamma=gamma)
    loss, ce = weighted_linear_ce(h, w, targets, weights, focal=(alpha, gamma) if focal else None)
    return loss, (ce.mean() if ce.numel() else ce.sum())


def forward_loss(lm, batch, settings, generator: torch.Generator):
    """The objective on one micro-batch: noise it, run the model, return (loss, mean CE, masked count as a tensor).
    `settings`: the diffusion settings (config.DiffusionConfig: objective, t_eps, time_reweighting, cart_p,
    token_reweighting, alpha, gamma); `generator` draws the noise levels and the masks."""
    llada = settings.objective == "llada"
    n_docs = batch.n_docs or int(batch.doc_ids.max()) + 1  # known on the CPU: no wait for the GPU
    t_doc = sample_t(n_docs, generator, LLADA_EPS if llada else settings.t_eps, device=batch.input_ids.device)  # [D]
    t = t_doc[batch.doc_ids.clamp(min=0)]  # [B, L]: each sequence's own noise level
    noisy, masked = mask_tokens(batch.input_ids, batch.maskable, t, lm.mask_token_id, generator)
    h = lm.hidden_at(noisy, attention_mask=batch.attention_mask, position_ids=batch.position_ids, positions=masked,
                     doc_ids=batch.doc_ids if batch.packed else None)  # [N, H]: only masked positions reach the head
    if llada:
        weights = llada_weights(t, masked, batch.maskable, batch.doc_ids)
    else:
        weights = position_weights(t, masked, settings.time_reweighting, settings.cart_p,
                                   doc_ids=batch.doc_ids if batch.packed else None)
    loss, ce = head_loss(lm.model.get_output_embeddings(), h, batch.input_ids[masked], weights,
                         focal=settings.token_reweighting, alpha=settings.alpha, gamma=settings.gamma)
    return loss, ce, masked.sum()
