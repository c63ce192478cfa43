"""What every sampler shares: the output type, token sampling (temperature, top-p, top-k), confidences, the
canvas and its positions. Pure functions; every random draw takes an explicit torch.Generator.

The samplers themselves live one per module (dreamtune.sampling: Dream's four algorithms;
dreamtune.fast_sampling: the block-wise sampler with a KV cache; dreamtune.llada_sampling: LLaDA's), each
with its settings as a frozen dataclass; dreamtune.engine chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def check_prompts(lm, input_ids, attention_mask, max_new_tokens: int) -> None:
    """ValueError with a fix for prompts every sampler refuses."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_length] with at least one prompt token, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("prompts must be left-padded (the last column real tokens for every row); pad on the left")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if lm.mask_token_id is None:
        raise ValueError("the model has no mask token id; load it with dreamtune.models.load")


def check_token_sampling(temperature: float, top_p: float | None, top_k: int | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


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
