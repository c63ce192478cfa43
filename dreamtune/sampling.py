"""Diffusion generation: Dream's `diffusion_generate` algorithms, and the entry point for the fast sampler.

    from dreamtune.sampling import generate
    out = generate(lm, input_ids, attention_mask, max_new_tokens=256, steps=256, alg="entropy",
                   temperature=0.2, generator=torch.Generator().manual_seed(0))
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
import torch.nn.functional as F

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "fast", "low_confidence", "random")
LLADA_ALGS = ("low_confidence", "random")  # dreamtune.llada_sampling
# Rows of the [N, V] vocabulary projection sampled at a time: bounds the float32 working set of a step
# (152k-entry vocabularies make [N, V] the largest tensor of generation).
SAMPLE_CHUNK_ELEMENTS = 1 << 27


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, L + max_new_tokens] long: the prompt, unchanged, then the answer
    history: list[torch.Tensor] | None  # canvases [B, L + max_new_tokens] (CPU) after each step, or None
    nfe: int  # forward passes through the model


# ------------------------------------------------------------------------------------- token sampling


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of tokens (by probability) whose cumulative probability passes top_p;
    the most likely token is always kept. logits [N, V] -> [N, V]."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)  # [N, V]
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token that crosses top_p
    remove[..., 0] = False
    remove = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep tokens whose logit is at least the k-th largest. logits [N, V] -> [N, V]."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [N, 1]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def token_probs(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's order: temperature, then top-p, then top-k, then softmax. logits [N, V] -> probs [N, V] float32."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    return torch.softmax(logits, dim=-1)


def pick_tokens(probs: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """x0 [N] and its probability [N]: sampled at temperature > 0, the argmax otherwise."""
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
        return x0, probs.gather(-1, x0[:, None]).squeeze(-1)
    conf, x0 = probs.max(dim=-1)
    return x0, conf


# One small function per confidence kind: (probs [N, V], probability of the chosen token [N]) -> [N].
def confidence_prob(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return chosen


def confidence_margin(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values  # [N, 2]
    return top2[:, 0] - top2[:, 1]


def confidence_neg_entropy(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return (probs * torch.log(probs + 1e-10)).sum(-1)


CONFIDENCE = {"maskgit_plus": confidence_prob, "topk_margin": confidence_margin, "entropy": confidence_neg_entropy}


def sample_from_hidden(head, h: torch.Tensor, *, temperature: float, top_p: float | None, top_k: int | None,
                       confidence=confidence_prob, generator: torch.Generator | None = None, ban: int | None = None):
    """Project hidden states h [N, H] through the vocabulary head and sample, in row chunks so the float32
    [N, V] working set stays bounded. Returns tokens [N] long and confidences [N] float32.

    `ban` (the mask token) is never drawn: it is never a training target, so a trained model gives it no
    mass, but an untrained one would leave masks on the canvas."""
    n = h.shape[0]
    vocab = head.weight.shape[0]
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // vocab)
    tokens, confs = [], []
    for i in range(0, n, chunk):
        logits = head(h[i:i + chunk]).float()  # [n_i, V]
        if ban is not None:
            logits[:, ban] = -torch.inf
        probs = token_probs(logits, temperature, top_p, top_k)
        x0, chosen = pick_tokens(probs, temperature, generator)
        tokens.append(x0)
        confs.append(confidence(probs, chosen))
    if not tokens:
        return h.new_zeros(0, dtype=torch.long), h.new_zeros(0, dtype=torch.float32)
    return torch.cat(tokens), torch.cat(confs)


# ------------------------------------------------------------------------------------- canvas set-up


def validate(lm, input_ids, attention_mask, *, max_new_tokens, steps, alg, temperature, top_p, top_k, alg_temp,
             eps, threshold, block_length):
    """ValueError with a fix for every user mistake in generate()'s arguments."""
    if alg not in ALGS:
        raise ValueError(f"unknown alg '{alg}'; use one of {', '.join(ALGS)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_length] with at least one prompt token, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("prompts must be left-padded (the last column real tokens for every row); pad on the left")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if alg != "fast" and int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp must be >= 0, got {alg_temp}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if block_length < 1:
        raise ValueError(f"block_length must be at least 1, got {block_length}")
    if lm.mask_token_id is None:
        raise ValueError("the model has no mask token id; load it with dreamtune.models.load")


def init_canvas(lm, input_ids, attention_mask, max_new_tokens):
    """The canvas [B, L] (prompt + masks), the key mask [B, L] bool or None when nothing is padded, and
    position ids [B, L] counting from each row's first real token (Dream's cumsum of the mask minus 1)."""
    b, p = input_ids.shape
    x = torch.cat([input_ids, input_ids.new_full((b, max_new_tokens), lm.mask_token_id)], dim=1)  # [B, L]
    if attention_mask is None or bool((attention_mask != 0).all()):
        pos = torch.arange(x.shape[1], device=x.device).expand(b, -1)  # [B, L]
        return x, None, pos
    keys = torch.cat([attention_mask != 0, attention_mask.new_ones((b, max_new_tokens), dtype=torch.bool)], dim=1)
    pos = (keys.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return x, keys, pos


def answer_hidden(lm, x, keys, pos, p: int) -> torch.Tensor:
    """The hidden states [B, N, H] that score the answer positions x[:, p:]: with Dream's shift, position i
    is scored from the output at i - 1 (p >= 1, so that is always a real position)."""
    h = lm.hidden_states(x, attention_mask=keys, position_ids=pos)  # [B, L, H]
    return h[:, p - 1:-1] if lm.shift else h[:, p:]


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
def generate(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             steps: int, alg: str = "origin", temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, alg_temp: float | None = 0.0, eps: float = 1e-3,
             generator: torch.Generator | None = None, return_history: bool = False, threshold: float = 0.9,
             block_length: int = 32, use_cache: bool = True, dual_cache: bool = False, stop_at_eos: bool = True,
             tokens_per_step: int | None = None, cuda_graphs: bool = True, cfg_scale: float = 0.0,
             logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             on_step: Callable[[torch.Tensor], None] | None = None) -> GenerateOutput:
    """Generate max_new_tokens after each (left-padded) prompt; see the module docstring.

    input_ids [B, P] long and attention_mask [B, P] (1 = real token, 0 = left pad) on the model's device.
    Dream's algorithms use steps, eps, alg_temp. alg="fast" uses threshold, block_length, use_cache,
    dual_cache, stop_at_eos, tokens_per_step and cuda_graphs instead (see dreamtune.fast_sampling.generate_fast).
    LLaDA's alg="low_confidence" | "random" use steps, block_length, temperature, cfg_scale, logits_eos_inf and
    confidence_eos_eot_inf (see dreamtune.llada_sampling.generate_llada).
    on_step(x) is called with the canvas x [B, P + max_new_tokens] after every step that ran the model (the
    demo streams it; it must not modify x).
    """
    validate(lm, input_ids, attention_mask, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
             temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=eps, threshold=threshold,
             block_length=block_length)
    if alg in LLADA_ALGS:
        from dreamtune.llada_sampling import generate_llada

        if top_p not in (None, 1) or top_k is not None:
            raise ValueError(f"LLaDA's sampler (alg {alg}) has no top-p/top-k filter; pass top_p=None and top_k=None")
        return generate_llada(lm, input_ids, attention_mask, max_new_tokens=max_new_tokens, steps=steps,
                              block_length=block_length, alg=alg, temperature=float(temperature), cfg_scale=cfg_scale,
                              logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                              generator=generator, return_history=return_history, on_step=on_step)
    if cfg_scale:
        raise ValueError(f"cfg_scale is a setting of LLaDA's sampler; use alg low_confidence or random, not {alg}")
    sampling = dict(temperature=float(temperature), top_p=top_p, top_k=top_k)
    if alg == "fast":
        from dreamtune.fast_sampling import generate_fast

        return generate_fast(lm, input_ids, attention_mask, max_new_tokens=max_new_tokens, generator=generator,
                             return_history=return_history, threshold=threshold, block_length=block_length,
                             use_cache=use_cache, dual_cache=dual_cache, stop_at_eos=stop_at_eos,
                             tokens_per_step=tokens_per_step, cuda_graphs=cuda_graphs, on_step=on_step, **sampling)

    x, keys, pos = init_canvas(lm, input_ids, attention_mask, max_new_tokens)
    p = input_ids.shape[1]
    grid = torch.linspace(1, eps, steps + 1)  # CPU float32: the counts are host integers, no device sync
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
