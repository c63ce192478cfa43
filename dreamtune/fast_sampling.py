"""The fast sampler: Fast-dLLM's training-free speed-ups, for any loaded diffusion LM (Dream, LLaDA, ...).

    from dreamtune.engine import generate
    out = generate(lm, input_ids, attention_mask, FastSampler(threshold=0.9, block_length=32), max_new_tokens=256)

- Block-wise, semi-autoregressive: the answer is decoded in blocks of `block_length`, left to right; the
  positions after the current block stay masks (and are attended as masks).
- Parallel reveal by confidence: each step reveals, per row, every masked position of the block whose
  confidence (the chosen token's probability) exceeds `threshold`, and always the most confident one;
  so threshold 1.0 reveals exactly one per step. `tokens_per_step=k` instead reveals the k most
  confident per step (a fixed schedule: used by bench/generate.py to show the cache's effect alone).
- Approximate KV cache: the first step of a block runs the whole canvas and keeps the K/V of the finished
  prefix; the block's later steps run only the window [last prefix position, end of canvas) against it.
  The prefix K/V are then those computed with the canvas as it was at the block's start (in a
  bidirectional model they depend on the block's tokens): that is the approximation. `dual_cache=True`
  also caches the masked suffix, so a step runs only [last prefix position, end of block).
  The window starts one position early because of Dream's shift: the first block position is scored
  from the output at the position before it. A model that does not shift (LLaDA) scores each block
  position from its own output; that extra column is then context only.
- Early stop: once a row finishes a block holding one of the model's stop tokens (`DiffusionLM.stop_ids`:
  every eos id, pad, a chat turn's end), the rest of its canvas is filled with pad and it needs no more
  decisions; generation ends when every row has. The answer, cut at its first stop token, is unchanged.

How the cache is laid out: dreamtune.kv_forward runs the decoder over chosen columns with the attention
written out; the first forward of a block feeds [cached columns, window] and keeps the first columns'
per-layer K/V; later steps run the window against them. Only positions (the position ids), never the
order of keys, matter to bidirectional attention. On a GPU each of these forwards is a CUDA graph once its
shape has been seen twice (the dual cache's shapes are the same for every block), so a batch-1 step costs
one launch instead of hundreds (`cuda_graphs=False` turns that off).

Exactness: with use_cache=False every step runs the whole canvas (the model as trained, block-wise schedule).
With the cache, a 1-layer model gives identical tokens (layer-0 K/V depend only on the token and its
position); deeper models differ from the uncached run by the approximation above.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from dreamtune.kv_forward import GraphCache, forward_columns, supports
from dreamtune.sampling_core import GenerateOutput, check_token_sampling, confidence_prob, init_canvas, sample_from_hidden


@dataclass(frozen=True)
class FastSampler:
    """The fast sampler's settings (see the module docstring). stop_at_eos and cuda_graphs change how much is
    computed, never the answer, so results do not record them."""

    threshold: float = 0.9
    block_length: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    tokens_per_step: int | None = None
    use_cache: bool = True
    dual_cache: bool = False
    stop_at_eos: bool = True
    cuda_graphs: bool = True
    NOT_RECORDED = ("stop_at_eos", "cuda_graphs")

    def __post_init__(self):
        check_token_sampling(self.temperature, self.top_p, self.top_k)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be at least 1, got {self.block_length}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be at least 1, got {self.tokens_per_step}")


def block_columns(start: int, end: int, total: int, dual_cache: bool, device):
    """(window [W], cached [C]) column indices for the block [start, end): the window opens one position
    before the block (the shift), and runs to the end of the canvas unless the suffix is cached too."""
    window_end = end if dual_cache else total
    window = torch.arange(start - 1, window_end, device=device)
    cached = torch.arange(0, start - 1, device=device)
    if dual_cache:
        cached = torch.cat([cached, torch.arange(end, total, device=device)])
    return window, cached


# The CUDA graphs of each model, kept with the model (weakly: they go when it goes), so that later
# generations replay them; one GraphCache (and its lock) per model, shared by concurrent generations.
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def graph_cache(model) -> GraphCache:
    """The fast sampler's CUDA graphs of `model` (made on first use)."""
    with _GRAPHS_LOCK:
        cache = _GRAPHS.get(model)
        if cache is None:
            cache = _GRAPHS[model] = GraphCache()
        return cache


def column_runner(lm, use_cache: bool, cuda_graphs: bool):
    """run(ids [B, W], pos [B, W], key_mask [B, C+W] | None, cached K/V | None, return_kv=False)
    -> hidden states [B, W, H] (and the columns' K/V): dreamtune.kv_forward, through CUDA graphs on a GPU
    unless cuda_graphs is False; a decoder it does not support runs the whole canvas through transformers."""
    model = lm.model
    if not supports(model):
        if use_cache:
            raise ValueError(f"the fast sampler's KV cache needs a Llama-style decoder without a sliding "
                             f"window (Qwen2/Dream, Llama, Mistral, Qwen3); {type(model).__name__} is not one: "
                             f"pass use_cache=False")
        return lambda ids, pos, key_mask, cached=None, return_kv=False: lm.hidden_states(ids, key_mask, pos)
    if not cuda_graphs:
        return lambda ids, pos, key_mask, cached=None, return_kv=False: forward_columns(
            model, ids, pos, key_mask, cached, return_kv)
    return graph_cache(model).bind(model)


def reveal_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every masked position with confidence above threshold, plus the most confident masked one.
    conf [B, K] (-inf where not masked), masked [B, K] bool -> [B, K] bool."""
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(-1, keepdim=True), True)
    return masked & ((conf > threshold) | best)


def reveal_top(conf: torch.Tensor, masked: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident masked positions per row (fewer if fewer are masked). [B, K] -> [B, K] bool."""
    idx = torch.topk(conf, min(k, conf.shape[1]), dim=-1).indices
    return masked & torch.zeros_like(masked).scatter_(1, idx, True)


def fill_id(lm) -> int:
    """The token the rest of a finished row's canvas becomes: pad (Dream fills the canvas after an answer with
    pad = eos), else the first stop id."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else getattr(lm.config, "pad_token_id", None)
    return int(pad) if pad is not None else lm.stop_ids[0]


@torch.no_grad()
def generate_fast(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sampler: FastSampler, *,
                  max_new_tokens: int, generator: torch.Generator | None = None, return_history: bool = False,
                  on_step=None) -> GenerateOutput:
    """See the module docstring. input_ids [B, P], attention_mask [B, P] (left padding)."""
    x, keys, pos = init_canvas(lm, input_ids, attention_mask, max_new_tokens)
    run = column_runner(lm, sampler.use_cache, sampler.cuda_graphs)
    with graph_cache(lm.model).lock:  # graphs own their buffers: one generation at a time uses them
        return _generate(lm, x, keys, pos, run, input_ids.shape[1], sampler, generator=generator,
                         return_history=return_history, on_step=on_step)


def _generate(lm, x, keys, pos, run, p: int, sampler: FastSampler, *, generator, return_history, on_step):
    total = x.shape[1]
    head = lm.model.get_output_embeddings()
    sampling = dict(temperature=float(sampler.temperature), top_p=sampler.top_p, top_k=sampler.top_k, generator=generator)
    block_length, use_cache, dual_cache = sampler.block_length, sampler.use_cache, sampler.dual_cache
    threshold, tokens_per_step = sampler.threshold, sampler.tokens_per_step
    stops = torch.tensor(lm.stop_ids, device=x.device) if sampler.stop_at_eos and lm.stop_ids else None  # [S]
    fill = fill_id(lm) if stops is not None else None
    history = [] if return_history else None
    shift = 1 if lm.shift else 0  # block column c is scored from the output at column c - shift
    nfe = 0
    for start in range(p, total, block_length):
        end = min(start + block_length, total)
        window, cached = block_columns(start, end, total, dual_cache, x.device)
        kv_keys = None if keys is None else keys[:, torch.cat([cached, window])]  # [B, C+W]: the block's later steps
        first = True
        while True:
            masked = x[:, start:end] == lm.mask_token_id  # [B, K]
            if not bool(masked.any()):
                break
            if not use_cache:
                h = run(x, pos, keys)  # [B, L, H]
                h_block = h[:, start - shift:end - shift]  # [B, K, H]
            else:
                if first:
                    # Fill the cache: the whole canvas, cached columns first, window last (see module doc).
                    cols = torch.cat([cached, window])
                    h, kv = run(x[:, cols], pos[:, cols], None if keys is None else keys[:, cols], None, True)
                    kv = [(k[:, :, :len(cached)], v[:, :, :len(cached)]) for k, v in kv]  # the cached columns'
                    h = h[:, len(cached):]  # [B, W, H]
                else:
                    # the prefix cache's window shrinks block by block, so its graph serves one block
                    # (captured at the block's second step); still faster than eager at 8 steps a block
                    h = run(x[:, window], pos[:, window], kv_keys, kv, False)  # [B, W, H]
                h_block = h[:, 1 - shift:1 - shift + end - start]  # window index 0 is column start - 1
            first = False
            nfe += 1
            tokens, conf = sample_from_hidden(head, h_block[masked], confidence=confidence_prob,
                                              ban=lm.mask_token_id, **sampling)
            full_conf = torch.full(masked.shape, -torch.inf, device=x.device)  # [B, K]
            full_conf[masked] = conf
            proposal = torch.full_like(x[:, start:end], lm.mask_token_id)
            proposal[masked] = tokens
            if tokens_per_step is None:
                reveal = reveal_threshold(full_conf, masked, threshold)
            else:
                reveal = reveal_top(full_conf, masked, tokens_per_step)
            x[:, start:end] = torch.where(reveal, proposal, x[:, start:end])
            if history is not None:
                history.append(x.detach().to("cpu", copy=True))
            if on_step is not None:
                on_step(x)
        if stops is not None and end < total:
            # the block is finished; one holding a stop token ends the answer (everything after it is cut
            # when decoded): the rest of that row's canvas becomes the fill token, and a row filled to the
            # end has no masks left, so later blocks skip it (a block all rows have filled runs no step)
            done = torch.isin(x[:, start:end], stops).any(-1, keepdim=True)  # [B, 1]
            tail = x[:, end:]
            tail.masked_fill_(done & (tail == lm.mask_token_id), fill)
    assert not bool((x[:, p:] == lm.mask_token_id).any()), "a mask token survived the fast sampler"
    return GenerateOutput(sequences=x, history=history, nfe=nfe)
