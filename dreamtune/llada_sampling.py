"""LLaDA's sampler (`alg="low_confidence" | "random"`), for any loaded diffusion LM.

    from dreamtune.engine import generate
    out = generate(lm, input_ids, attention_mask, LLaDASampler(steps=128, block_length=32), max_new_tokens=256,
                   generator=torch.Generator().manual_seed(0))

The semantics of `generate` in LLaDA's `generate.py`:
- canvas = prompt + max_new_tokens masks, decoded in max_new_tokens / block_length blocks left to right
  (semi-autoregressive), steps / blocks steps per block;
- per block, the reveal count of each step: base = masked // steps_per_block, plus one for the first
  (masked % steps_per_block) steps;
- each step: one forward; x0 = argmax of the logits, with Gumbel noise in float64 at temperature > 0
  (`exp(logits) / (-log u) ** temperature`, u uniform); confidence = the softmax probability of x0
  (`low_confidence`) or uniform random (`random`); only the current block's masked positions compete
  (positions after it have confidence -inf); the k most confident are revealed;
- cfg_scale > 0: unsupervised classifier-free guidance: a second forward with the prompt masked, and
  logits = un + (cfg_scale + 1) * (cond - un);
- logits_eos_inf: the eos ids get logit -inf (never proposed); confidence_eos_eot_inf: a position whose
  proposal is a stop token (eos, pad, end of turn) is revealed only after every other masked position of
  its block.

Where this differs from LLaDA's code, on purpose, without changing what is computed at temperature 0:
- only the current block's positions are projected through the vocabulary (the others cannot be
  revealed), and a step that reveals nothing skips its forward (LLaDA runs it), so `nfe` can be below
  `steps`; with cfg_scale each step is one forward over twice the rows;
- every random draw takes the explicit `generator`;
- the mask token is never proposed (an untrained model could otherwise leave masks on the canvas);
- confidence_eos_eot_inf ranks stop-token proposals last instead of giving them -inf (LLaDA's -inf ties
  them with positions outside the block, so its top-k could reveal a position past the block);
- left padding: pads are not attended and positions count from each row's first real token (as
  dreamtune's other samplers); a block_length above max_new_tokens means one block.
A model that shifts (Dream) is scored as it was trained: position i from output i-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dreamtune.sampling_core import GenerateOutput, answer_hidden, init_canvas
from dreamtune.tokenizer import ids_of

LLADA_ALGS = ("low_confidence", "random")


@dataclass(frozen=True)
class LLaDASampler:
    """LLaDA's `generate` settings. steps None: one step per new token."""

    alg: str = "low_confidence"
    steps: int | None = None
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self):
        if self.alg not in LLADA_ALGS:
            raise ValueError(f"unknown alg '{self.alg}' for LLaDA's sampler; use one of {', '.join(LLADA_ALGS)}")
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be at least 1, got {self.block_length}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}")


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to reveal at each step of a block: masked [B, N] bool -> [B, steps] long, base = n // steps,
    plus one for the first n % steps steps (LLaDA's linear schedule spreads the block evenly)."""
    n = masked.sum(dim=1, keepdim=True)  # [B, 1]
    extra = torch.arange(steps, device=masked.device)[None, :] < n % steps  # [B, steps]
    return n // steps + extra.long()


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's token choice: the argmax of exp(logits) / (-log u) ** temperature in float64 (Gumbel-max;
    low precision is known to hurt generation quality), the plain argmax at temperature 0. [..., V] -> [...]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.to(torch.float64)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return (x.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)


def eos_ids(lm) -> list[int]:
    """The ids `logits_eos_inf` bans: every eos of the model's config and its tokenizer."""
    ids = set(ids_of(getattr(lm.model.config, "eos_token_id", None)))
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return sorted(ids)


def block_logits(lm, x, keys, pos, p: int, s: int, e: int, cfg_scale: float) -> torch.Tensor:
    """float32 logits [B, e - s, V] scoring the canvas columns [s, e); with cfg_scale > 0, guided by a second
    forward in which the prompt columns [0, p) are masks."""
    head = lm.model.get_output_embeddings()
    if cfg_scale <= 0:
        h = answer_hidden(lm, x, keys, pos, p)[:, s - p:e - p]  # [B, Lb, H]
        return head(h).float()
    un = x.clone()
    un[:, :p] = lm.mask_token_id
    both = torch.cat([x, un])  # [2B, L]
    keys2 = None if keys is None else torch.cat([keys, keys])
    h = answer_hidden(lm, both, keys2, torch.cat([pos, pos]), p)[:, s - p:e - p]  # [2B, Lb, H]
    cond, uncond = head(h).float().chunk(2)  # [B, Lb, V] each
    return uncond + (cfg_scale + 1) * (cond - uncond)


def reveal(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] highest-confidence entries of each row: conf [B, N] (-inf = not eligible), k [B] -> bool [B, N]."""
    order = conf.argsort(dim=1, descending=True, stable=True)  # [B, N]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return rank < k[:, None]


def check_args(max_new_tokens: int, steps: int, block_length: int) -> tuple[int, int]:
    """(block_length, steps per block), or ValueError with the fix."""
    block_length = min(int(block_length), int(max_new_tokens))
    if max_new_tokens % block_length:
        raise ValueError(f"max_new_tokens {max_new_tokens} is not a multiple of block_length {block_length}; LLaDA's sampler "
                         f"decodes whole blocks (e.g. --max-new-tokens {max_new_tokens - max_new_tokens % block_length or block_length})")
    blocks = max_new_tokens // block_length
    if steps % blocks:
        raise ValueError(f"steps {steps} cannot be split over {blocks} blocks of {block_length} tokens; pass a multiple of "
                         f"{blocks} (e.g. --steps {blocks * max(1, steps // blocks)})")
    return block_length, steps // blocks


@torch.no_grad()
def generate_llada(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sampler: LLaDASampler, *,
                   max_new_tokens: int, generator: torch.Generator | None = None, return_history: bool = False,
                   on_step: Callable[[torch.Tensor], None] | None = None) -> GenerateOutput:
    """LLaDA's sampler (see the module docstring). input_ids [B, P], attention_mask [B, P] (left padding)."""
    alg, temperature, cfg_scale = sampler.alg, float(sampler.temperature), sampler.cfg_scale
    block_length, per_block = check_args(max_new_tokens, sampler.steps or max_new_tokens, sampler.block_length)
    x, keys, pos = init_canvas(lm, input_ids, attention_mask, max_new_tokens)  # [B, L]
    p, mask = input_ids.shape[1], lm.mask_token_id
    banned = torch.tensor(eos_ids(lm) if sampler.logits_eos_inf else [], dtype=torch.long, device=x.device)
    last = torch.tensor(lm.stop_ids if sampler.confidence_eos_eot_inf else [], dtype=torch.long, device=x.device)
    history = [] if return_history else None
    nfe = 0
    for b in range(max_new_tokens // block_length):
        s, e = p + b * block_length, p + (b + 1) * block_length
        counts = transfer_counts(x[:, s:e] == mask, per_block)  # [B, per_block]
        for i in range(per_block):
            k = counts[:, i]  # [B]
            if bool((k > 0).any()):
                logits = block_logits(lm, x, keys, pos, p, s, e, cfg_scale)  # [B, Lb, V]
                nfe += 1
                logits[..., banned] = -torch.inf
                choice = logits.clone()
                choice[..., mask] = -torch.inf
                x0 = gumbel_argmax(choice, temperature, generator)  # [B, Lb]
                masked = x[:, s:e] == mask  # [B, Lb]
                if alg == "low_confidence":
                    probs = torch.softmax(logits.to(torch.float64), dim=-1)  # [B, Lb, V]
                    conf = probs.gather(-1, x0[..., None]).squeeze(-1)  # [B, Lb]
                else:
                    conf = torch.rand(masked.shape, generator=generator, device=x.device, dtype=torch.float64)
                conf = conf.masked_fill(masked & torch.isin(x0, last), -1.0)  # below every probability, above -inf
                conf = conf.masked_fill(~masked, -torch.inf)
                assert bool((k <= masked.sum(1)).all()), "a step must not reveal more than the block's masks"
                chosen = reveal(conf, k)  # [B, Lb]
                x[:, s:e] = torch.where(chosen, x0, x[:, s:e])
                if on_step is not None:
                    on_step(x)
            if history is not None:
                history.append(x.detach().to("cpu", copy=True))
    assert not bool((x[:, p:] == mask).any()), "a mask token survived the last step"
    return GenerateOutput(sequences=x, history=history, nfe=nfe)
