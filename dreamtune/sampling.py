"""Dream's sampler: the four algorithms of Dream's `diffusion_generate`.

    from dreamtune.engine import generate
    out = generate(lm, input_ids, attention_mask, DreamSampler(alg="entropy", steps=256, temperature=0.2),
                   max_new_tokens=256, generator=torch.Generator().manual_seed(0))
    out.sequences  # [B, L + 256]: the prompt, unchanged, then the answer (eos-filled at the end)

`alg` is one of Dream's `origin`, `maskgit_plus`, `topk_margin`, `entropy` (this module, with the semantics
of Dream's `diffusion_generate`), or `fast` (dreamtune.fast_sampling: block-wise decoding
with a confidence threshold and an approximate KV cache, after Fast-dLLM).

Dream's loop, as implemented here:
- canvas = prompt + max_new_tokens mask tokens; time grid linspace(1, eps, steps + 1);
- step i (t = grid[i], s = grid[i+1]): `origin` reveals each masked position with probability 1 - s/t
  (all at the last step); the confidence algorithms reveal the int(n * (1 - s/t)) most confident masked
  positions per row, n = the batch mean of masked counts (int(n) at the last step), or, with alg_temp > 0,
  positions drawn without replacement from softmax(confidence / alg_temp);
- tokens: logits / temperature (if > 0), top-p, top-k, softmax; sampled at temperature > 0 (confidence =
  the sampled token's probability), argmax otherwise; `topk_margin` uses top1 - top2 and `entropy` the
  negative entropy of those same probabilities.
- left padding: pads are never attended and positions count from each row's first real token.

`low_confidence` and `random` are LLaDA's sampler (dreamtune.llada_sampling: semi-autoregressive blocks
of block_length, steps split over the blocks, classifier-free guidance with cfg_scale).

Where this differs from Dream's code, on purpose, without changing what is computed:
- a step that reveals nothing skips its forward pass (Dream runs it and discards it), so `nfe` can be
  below `steps`; `origin` draws its reveal decisions before the forward and scores only those positions;
- the vocabulary projection and the sampling maths run only over the positions that need them, in
  float32 (Dream does them over the whole canvas in the model's dtype, bf16, where confidences tie more);
- pads are excluded as keys (Dream uses the outer product of the pad mask): identical at every real
  position, and never a fully masked attention row;
- alg_temp draws positions by Gumbel-top-k, the same distribution as Dream's multinomial without
  replacement, but it cannot fail when some probabilities underflow to zero;
- every random draw takes the explicit `generator`;
- the mask token is never sampled (Dream could draw it at temperature > 0 and leave it on the canvas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dreamtune.sampling_core import (
    GenerateOutput,
    answer_hidden,
    check_token_sampling,
    confidence_margin,
    confidence_neg_entropy,
    confidence_prob,
    init_canvas,
    sample_from_hidden,
)

CONFIDENCE = {"maskgit_plus": confidence_prob, "topk_margin": confidence_margin, "entropy": confidence_neg_entropy}
DREAM_ALGS = ("origin",) + tuple(CONFIDENCE)


@dataclass(frozen=True)
class DreamSampler:
    """Dream's `diffusion_generate` settings. steps None: one step per new token (Dream's default use)."""

    alg: str = "origin"
    steps: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float = 0.0
    eps: float = 1e-3

    def __post_init__(self):
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"unknown alg '{self.alg}' for Dream's sampler; use one of {', '.join(DREAM_ALGS)}")
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        check_token_sampling(self.temperature, self.top_p, self.top_k)
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")


# ------------------------------------------------------------------------------------- Dream's loop


def reveal_count(n_masked: float, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Dream's count for one step: int(n * (1 - s/t)), int(n) at the last step (float32 arithmetic, as Dream)."""
    n = torch.tensor(n_masked, dtype=torch.float32)
    return int(n) if last else int(n * (1 - s / t))


def gumbel_topk(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k indices per row drawn without replacement from softmax(scores) (Plackett-Luce via Gumbel noise).
    scores [B, N] with -inf where not allowed -> [B, k]."""
    u = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0)
    return torch.topk(scores - torch.log(-torch.log(u)), k, dim=-1).indices


def _step_confidence(lm, x, keys, pos, p, *, k, alg, alg_temp, sampling, generator):
    """Reveal k positions per row of the answer region x[:, p:], chosen by confidence (or drawn with alg_temp)."""
    masked = x[:, p:] == lm.mask_token_id  # [B, N]
    h = answer_hidden(lm, x, keys, pos, p)  # [B, N, H]
    tokens, conf = sample_from_hidden(lm.model.get_output_embeddings(), h[masked], confidence=CONFIDENCE[alg],
                                      generator=generator, ban=lm.mask_token_id, **sampling)  # [M], [M]
    full_conf = torch.full(masked.shape, -torch.inf, device=x.device)  # [B, N]
    full_conf[masked] = conf
    proposal = torch.full_like(masked, lm.mask_token_id, dtype=x.dtype)  # [B, N]
    proposal[masked] = tokens
    if alg_temp:
        idx = gumbel_topk(full_conf / alg_temp, k, generator)  # [B, k]
    else:
        idx = torch.topk(full_conf, k, dim=-1).indices  # [B, k]
    x[:, p:].scatter_(1, idx, proposal.gather(1, idx))


def _step_origin(lm, x, keys, pos, p, *, prob, sampling, generator):
    """Reveal each masked position of x[:, p:] with probability `prob`; returns False if none was drawn
    (then no forward pass is needed)."""
    masked = x[:, p:] == lm.mask_token_id  # [B, N]
    draw = torch.rand(masked.shape, generator=generator, device=x.device) < prob
    reveal = masked & draw  # [B, N]
    if not bool(reveal.any()):
        return False
    h = answer_hidden(lm, x, keys, pos, p)  # [B, N, H]
    tokens, _ = sample_from_hidden(lm.model.get_output_embeddings(), h[reveal], generator=generator,
                                   ban=lm.mask_token_id, **sampling)
    x[:, p:][reveal] = tokens
    return True


@torch.no_grad()
def generate_dream(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sampler: DreamSampler, *,
                   max_new_tokens: int, generator: torch.Generator | None = None, return_history: bool = False,
                   on_step: Callable[[torch.Tensor], None] | None = None) -> GenerateOutput:
    """Dream's loop (see the module docstring). input_ids [B, P], attention_mask [B, P] (left padding)."""
    alg, alg_temp = sampler.alg, sampler.alg_temp
    steps = sampler.steps or max_new_tokens
    sampling = dict(temperature=float(sampler.temperature), top_p=sampler.top_p, top_k=sampler.top_k)
    x, keys, pos = init_canvas(lm, input_ids, attention_mask, max_new_tokens)
    p = input_ids.shape[1]
    grid = torch.linspace(1, sampler.eps, steps + 1)  # CPU float32: the counts are host integers, no device sync
    history = [] if return_history else None
    n_masked = float(max_new_tokens)  # the confidence algorithms reveal the same count in every row
    nfe = 0
    for i in range(steps):
        t, s, last = grid[i], grid[i + 1], i == steps - 1
        nfe_before = nfe
        if alg == "origin":
            prob = 1.0 if last else float(1 - s / t)
            nfe += _step_origin(lm, x, keys, pos, p, prob=prob, sampling=sampling, generator=generator)
        else:
            k = reveal_count(n_masked, t, s, last)
            assert 0 <= k <= n_masked, (k, n_masked)
            if k > 0:
                _step_confidence(lm, x, keys, pos, p, k=k, alg=alg, alg_temp=alg_temp, sampling=sampling,
                                 generator=generator)
                nfe += 1
                n_masked -= k
        if history is not None:
            history.append(x.detach().to("cpu", copy=True))
        if on_step is not None and nfe > nfe_before:  # a step that revealed nothing shows nothing new
            on_step(x)
    assert not bool((x[:, p:] == lm.mask_token_id).any()), "a mask token survived the last step"
    return GenerateOutput(sequences=x, history=history, nfe=nfe)
