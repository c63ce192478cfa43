"""The decoder run over chosen canvas columns against an explicit K/V cache, and CUDA graphs of that run.

The fast sampler's cached steps run a few columns (the window) against keys and values of the rest of the
canvas computed earlier. Through transformers' forward and a DynamicCache this costs about 1 ms of Python
and kernel launches per layer: at batch 1 a 7B step is launch-bound (24 ms for work the GPU does in ~5).
`forward_columns` runs the model's own modules (projections, norms, MLP, rotary embedding) with the
attention written out (one scaled_dot_product_attention over [cached keys, window keys]); on a GPU
`GraphCache` captures that run once per shape as a CUDA graph and replays it, so a step costs one launch.

For the Llama-style decoders dreamtune loads: Qwen2 (= Dream), Llama, Mistral without a sliding window, Qwen3
(with its q/k norms);
`supports` says whether a model has that structure. With the cached K/V computed from the same canvas, the
hidden states of the window equal the full forward's at those columns (tested against transformers).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v) [B, kv_heads, C, head_dim]


def supports(model) -> bool:
    """True when `model` (a *ForCausalLM) has the Llama-style decoder forward_columns runs."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in dec.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return False
        # windowed layers (not in Dream) are not handled here; Mistral keeps the window in its config only
        window = (attn.sliding_window if hasattr(attn, "sliding_window")
                  else getattr(getattr(attn, "config", None), "sliding_window", None))
        if window is not None:
            return False
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
    return True


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding (the rotate-half form of Llama/Qwen2). q, k [B, heads, W, D]; cos, sin [B, W, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, W, D]

    def rot(t):
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@torch.no_grad()
def forward_columns(model, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None,
                    cached: KV | None = None, return_kv: bool = False):
    """Final-norm hidden states [B, W, H] of the columns `ids` [B, W] at positions `pos` [B, W].

    The columns attend to each other and, when given, to `cached` (per layer K/V [B, kv_heads, C, D] of other
    columns, already rotated). key_mask [B, C + W] bool (True = attend; cached columns first) or None when
    nothing is padded. With return_kv, also the columns' own per-layer K/V [B, kv_heads, W, D]."""
    dec = model.get_decoder()
    b, w = ids.shape
    x = dec.embed_tokens(ids)  # [B, W, H]
    cos, sin = dec.rotary_emb(x, pos)  # [B, W, D] each
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, C + W]
    kvs = []
    for i, layer in enumerate(dec.layers):
        attn = layer.self_attn
        y = layer.input_layernorm(x)
        shape = (b, w, -1, attn.head_dim)
        q, k, v = attn.q_proj(y).view(shape), attn.k_proj(y).view(shape), attn.v_proj(y).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, W, D]
        q, k = rotate(q, k, cos, sin)
        if return_kv:
            kvs.append((k, v))
        if cached is not None:
            k, v = torch.cat([cached[i][0], k], dim=2), torch.cat([cached[i][1], v], dim=2)  # [B, kvh, C+W, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])  # [B, heads, W, D]
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, w, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = dec.norm(x)
    return (h, kvs) if return_kv else h


def weights_signature(model) -> int:
    """A hash of every weight's address and dtype: a model moved, cast or reloaded gets new graphs (a graph
    reads the addresses it was captured with)."""
    return hash(tuple((p.data_ptr(), p.dtype) for p in model.parameters()))


class _Graph:
    """One captured forward_columns call: static inputs are copied in, the graph replayed, outputs read."""

    def __init__(self, model, ids, pos, key_mask, cached: KV | None, return_kv: bool):
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.ids, self.pos, self.key_mask = clone(ids), clone(pos), clone(key_mask)
        self.cached = None if cached is None else [(k.clone(), v.clone()) for k, v in cached]
        run = lambda: forward_columns(model, self.ids, self.pos, self.key_mask, self.cached, return_kv)  # noqa: E731
        # Streams of the model's device (the caller made it current), never the process-wide default
        # capture stream: a rank whose model is on cuda:1 would otherwise capture an empty graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Each graph has its own memory pool: graphs sharing one may only be replayed in capture order, and
        # the sampler replays a block's full-canvas graph and its window graph in either order.
        # thread_local: another thread's CUDA work (a second demo request sampling) does not void the capture.
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            self.out = run()

    def __call__(self, ids, pos, key_mask, cached: KV | None):
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if key_mask is not None:
            self.key_mask.copy_(key_mask)
        if cached is not None:  # one multi-tensor copy, not 2 x layers launches
            torch._foreach_copy_([t for kv in self.cached for t in kv], [t for kv in cached for t in kv])
        self.graph.replay()
        return self.out  # static tensors: valid until this graph is replayed again


class GraphCache:
    """forward_columns through CUDA graphs, one per input shape, captured the second time a shape is seen
    (a shape met once is not worth a capture) and kept for later calls, the most recent `capacity` of them.
    Only forwards of at most `max_tokens` rows x (window + cached) columns are graphed: larger ones are
    compute-bound (batch 32 ran as fast without graphs), and each graph holds its own memory pool and a copy
    of the cached K/V. On a CPU every call runs eagerly."""

    def __init__(self, capacity: int = 4, max_tokens: int = 2048):
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.graphs: OrderedDict = OrderedDict()
        self.seen: dict = {}
        self.disabled = False  # set when a capture fails: everything then runs eagerly
        # graphs own their inputs and outputs: one caller at a time (a generation holds it throughout, since
        # it reads one graph's outputs while replaying another)
        self.lock = threading.RLock()

    def run(self, model, ids, pos, key_mask, cached: KV | None = None, return_kv: bool = False, *, weights=None):
        """forward_columns(...), through a CUDA graph once the shape has recurred. `weights`: the model's
        weights_signature when the caller computed it once for many calls (see `bind`)."""
        # rows x (window + cached) columns: a graph holds a copy of the cached K/V as well
        tokens = ids.shape[0] * (ids.shape[1] + (0 if cached is None else cached[0][0].shape[2]))
        if ids.device.type != "cuda" or self.disabled or tokens > self.max_tokens:
            return forward_columns(model, ids, pos, key_mask, cached, return_kv)
        with self.lock, torch.cuda.device(ids.device):
            return self._run(model, weights_signature(model) if weights is None else weights,
                             ids, pos, key_mask, cached, return_kv)

    def bind(self, model):
        """run(ids, pos, key_mask, cached, return_kv) for one generation: the weights do not change within
        it, so their signature is computed once (a walk over every parameter, not one per step)."""
        weights = weights_signature(model)
        return lambda *args: self.run(model, *args, weights=weights)

    def _run(self, model, weights, ids, pos, key_mask, cached, return_kv):
        key = (id(model), weights, tuple(ids.shape), key_mask is not None and tuple(key_mask.shape),
               None if cached is None else tuple(cached[0][0].shape), return_kv)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.seen) > 1024:  # many one-off shapes (an eval over varied prompt lengths): forget them
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2:
                return forward_columns(model, ids, pos, key_mask, cached, return_kv)
            try:
                graph = _Graph(model, ids, pos, key_mask, cached, return_kv)
            except RuntimeError as e:  # a model or kernel that cannot be captured: correct, only slower
                warnings.warn(f"CUDA graph capture failed, the fast sampler runs eagerly: {e}", stacklevel=2)
                self.disabled = True
                return forward_columns(model, ids, pos, key_mask, cached, return_kv)
            self.graphs[key] = graph
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return graph(ids, pos, key_mask, cached)
