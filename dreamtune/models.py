"""The model layer: any supported checkpoint as a masked diffusion LM on transformers' own classes.

A diffusion LM here is a plain transformers `Qwen2ForCausalLM` / `LlamaForCausalLM` (or another decoder
whose attention honours `config.is_causal`) with `config.is_causal = False`, wrapped by `DiffusionLM`,
which knows two more facts: the mask token id, and whether logits shift (Dream keeps the autoregressive
alignment, so position i is scored from the output at i-1; LLaDA does not shift).

What loads (`load(path_or_id)`):
- a Dream checkpoint (config.json `model_type: "Dream"`): its config is mapped to Qwen2 and its weights,
  which already use Qwen2's parameter names, load without remote code;
- a LLaDA checkpoint (`model_type: "llada"`, LLaDA's own keys and parameter names): read by
  dreamtune.llada into transformers' Llama, no shift;
- a dreamtune export (an HF directory with `dreamtune.json` beside config.json);
- any Hugging Face Qwen2/Llama-family causal LM, adapted as Dream was made from Qwen2.5: attention made
  bidirectional, shift on, and a `<|mask|>` token added to the tokenizer and the embeddings if missing.

What is written (dreamtune.export): `save_hf` (a directory dreamtune and `AutoModelForCausalLM` load) and `save_dream` (a
Dream-format directory: model_type "Dream", Dream's config keys, the same parameter names); dreamtune.llada's
`save_llada` writes LLaDA's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dreamtune.hub import read_json_file, resolve_dir
from dreamtune.tokenizer import TURN_END_TOKENS, ids_of, load_tokenizer

MASK_TOKEN = "<|mask|>"
META_FILE = "dreamtune.json"
# model_type -> how to treat it. Dream is Qwen2 under another name; the rest load through Auto classes.
DECODER_TYPES = ("qwen2", "llama", "mistral", "qwen3")
SUPPORTED_TYPES = ("Dream", "llada") + DECODER_TYPES  # llada: LLaDA's own format (dreamtune.llada)

# Dream's config.json keys that Qwen2Config also has (everything else Dream writes is metadata).
_DREAM_TO_QWEN2_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "tie_word_embeddings", "attention_dropout", "use_sliding_window", "sliding_window",
    "max_window_layers", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id",
)


@dataclass
class DiffusionLM:
    """A bidirectional decoder plus the two facts a masked diffusion LM needs."""

    model: nn.Module  # transformers *ForCausalLM with config.is_causal == False
    tokenizer: Any | None
    mask_token_id: int
    shift: bool  # True: position i is scored from output i-1 (Dream); False: from output i (LLaDA)
    source: str = ""
    source_dir: Path | None = None  # the directory it was loaded from (export copies its small files)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the model computes: the device of a parameter other than the input embeddings (which
        model.offload_embeddings keeps in CPU memory)."""
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        skip = {id(p) for p in emb.parameters()} if emb is not None else set()
        return next((p.device for p in self.model.parameters() if id(p) not in skip),
                    next(self.model.parameters()).device)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, doc_ids=None) -> torch.Tensor:
        """Final-norm hidden states [B, L, H]. A 2-D 0/1 `attention_mask` marks pads (left padding):
        pads are not attended, and positions count from the first real token, as Dream's generation does.
        doc_ids [B, L] (packed rows): each position attends only to its own document; the mask is built
        for the attention implementation in use (a BlockMask for flex_attention, a dense mask otherwise)."""
        if doc_ids is not None:
            assert attention_mask is None, "packed rows carry their mask in doc_ids"
            attention_mask = document_attention_mask(doc_ids, self.model.config._attn_implementation)
        dense = isinstance(attention_mask, torch.Tensor)  # a flex BlockMask passes through untouched
        if dense and attention_mask.dim() == 2 and position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        if dense and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
                dtype = self.model.get_input_embeddings().weight.dtype
                attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                    ~attention_mask, torch.finfo(dtype).min)
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def hidden_at(self, input_ids, attention_mask=None, position_ids=None, positions=None, doc_ids=None) -> torch.Tensor:
        """The hidden states that score each position (the shift applied): [B, L, H], or [N, H] at the True
        entries of the bool mask `positions` [B, L] in row-major order."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, doc_ids)  # [B, L, H]
        if self.shift:
            # Dream: the prediction for position i comes from the output at i-1; position 0 keeps its own.
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        if positions is not None:
            assert positions.shape == input_ids.shape, "positions must be a bool mask shaped like input_ids"
            return h[positions]  # [N, H]
        return h

    def logits(self, input_ids, attention_mask=None, position_ids=None, positions=None, doc_ids=None) -> torch.Tensor:
        """Logits that score each position's own token: `logits[:, i]` predicts `input_ids[:, i]`.

        positions: optional bool [B, L]; then only those rows are projected through the vocabulary and the
        result is [N, V] in row-major order of the True entries (the loss needs masked positions only, and a
        152k-wide vocabulary makes full logits the largest tensor of a step).
        """
        h = self.hidden_at(input_ids, attention_mask, position_ids, positions, doc_ids)
        return self.model.get_output_embeddings()(h)  # [B, L, V] or [N, V]

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: every eos id of the config, the generation config and the tokenizer
        (lists included, as Llama 3's), pad (Dream fills the canvas after an answer with it), and the end of a
        chat turn. Sorted, so tensors built from it are the same on every run."""
        ids: set[int] = set()
        for src in (self.model.config, getattr(self.model, "generation_config", None)):
            for key in ("eos_token_id", "pad_token_id"):
                ids.update(ids_of(getattr(src, key, None)))
        tok = self.tokenizer
        if tok is not None:
            ids.update(i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None)
            vocab = tok.get_vocab()
            ids.update(vocab[t] for t in TURN_END_TOKENS if t in vocab)
        ids.discard(self.mask_token_id)
        return sorted(ids)

    def to(self, *args, **kwargs) -> "DiffusionLM":
        self.model.to(*args, **kwargs)
        return self


def document_attention_mask(doc_ids: torch.Tensor, implementation: str):
    """Attention restricted to each position's own document (packing). Padding (-1) sees only padding.
    flex_attention: a BlockMask (sparse: cost grows with the documents, not the row). Otherwise a dense
    bool [B, 1, L, L] mask (sdpa), converted to additive form for eager in hidden_states."""
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc(b, h, q, kv):
            return doc_ids[b, q] == doc_ids[b, kv]

        B, L = doc_ids.shape
        return create_block_mask(same_doc, B, None, L, L, device=doc_ids.device)
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # [B, 1, L, L]


# ----------------------------------------------------------------------------------------------- loading


def read_config(d: Path) -> dict:
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"'{d}' has no config.json, so it is not a model directory; pass the directory that holds config.json and the weights")
    return read_json_file(cfg_path, "re-download or re-export the model")


def read_meta(d: Path) -> dict:
    """dreamtune.json of an export ({} when absent)."""
    return read_json_file(d / META_FILE, "re-export the model") if (d / META_FILE).exists() else {}


def check_safetensors(path: Path) -> None:
    """ValueError naming `path` unless it is a whole safetensors file: its header's tensors must end where the
    file ends (a download or a save that stopped early leaves it shorter). Reads only the header."""
    size = path.stat().st_size
    end = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n <= size - 8:
            try:
                meta = json.loads(f.read(n))
                end = 8 + n + max((t["data_offsets"][1] for k, t in meta.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                end = None
    if end != size:
        what = f"{size} bytes where its header describes {end}" if end is not None else f"{size} bytes, no readable header"
        raise ValueError(f"{path} is cut short or damaged ({what}): the download or save did not finish; "
                         f"download or export the model again")


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted(names)}")
    return names[dtype]


def check_weights(d: Path) -> None:
    """FileNotFoundError unless `d` holds weights, every shard its index names included (a partial download);
    ValueError for a safetensors file cut short."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    present = [w for w in weights if (d / w).exists()]
    if not present:
        raise FileNotFoundError(f"{d} has a config but no weights (none of {', '.join(weights)}); point at a "
                                f"complete model directory, e.g. RUN/checkpoint-final")
    if present[0].endswith(".index.json"):
        index = d / present[0]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{index} is not a valid shard index (no weight_map); re-download the model") from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} lacks {len(missing)} of the {len(shards)} weight shards its index names "
                                    f"(e.g. {missing[0]}): the download is incomplete; download it again")
        for shard in shards:
            if shard.endswith(".safetensors"):
                check_safetensors(d / shard)
    elif present[0] == "model.safetensors":
        check_safetensors(d / present[0])


def check_model_dir(path_or_id) -> str:
    """What `train --dry-run` checks without loading weights: config, weights and a tokenizer that loads.
    Returns a one-line summary; a hub id that is not in the local cache yet is reported, not fetched."""
    d = resolve_dir(path_or_id, download=False)
    if d is None:
        return f"{path_or_id}: a hub id not in the local cache; training downloads it first"
    cfg = read_config(d)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{d}/config.json has model_type '{model_type}', which dreamtune cannot load; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    check_weights(d)
    meta = read_meta(d)
    tok = load_tokenizer(d, {**cfg, **meta})
    if tok is None:
        raise ValueError(f"{d} has no tokenizer files; training needs one to render the data")
    return f"{d}: model_type {model_type}, tokenizer of {len(tok)} tokens"


def dream_to_qwen2_config(cfg: dict):
    """Dream's config.json as a transformers Qwen2Config with bidirectional attention."""
    from transformers import Qwen2Config

    kwargs = {k: cfg[k] for k in _DREAM_TO_QWEN2_KEYS if k in cfg and k not in ("rope_theta", "rope_scaling")}
    rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    qcfg = Qwen2Config(rope_parameters=rope, **kwargs)
    qcfg.is_causal = False
    qcfg.mask_token_id = cfg.get("mask_token_id")
    return qcfg


def generation_config(d: Path):
    """generation_config.json as a transformers GenerationConfig of its token ids alone (None if absent).
    Dream's file also holds its sampler's settings (alg, steps, temperature 0 without do_sample), which
    transformers would read as invalid generation flags and warn about; dreamtune's samplers take their
    settings from the caller, and export copies the file itself."""
    from transformers import GenerationConfig

    path = d / "generation_config.json"
    if not path.exists():
        return None
    raw = read_json_file(path, "re-download the model")
    return GenerationConfig(**{k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None})


def load(path_or_id, dtype=None, device=None, attn_implementation: str | None = None,
         mask_token_id: int | None = None, shift: bool | None = None) -> DiffusionLM:
    """Load a diffusion LM from a local directory or a hub id (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load clutters logs and tests
    d = resolve_dir(path_or_id)
    cfg = read_config(d)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"{d}/config.json has model_type '{model_type}', which dreamtune cannot load; supported: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    meta = read_meta(d)
    check_weights(d)
    tdtype = _dtype(dtype)
    # "auto": transformers' own choice (sdpa where it can)
    extra = {"attn_implementation": attn_implementation} if attn_implementation not in (None, "auto") else {}
    if tdtype is not None:
        extra["dtype"] = tdtype
    gen = generation_config(d)
    if gen is not None:
        extra["generation_config"] = gen
    mask_id = mask_token_id or meta.get("mask_token_id") or cfg.get("mask_token_id")
    check_mask_id(mask_id, cfg.get("vocab_size"), d)
    tokenizer = load_tokenizer(d, {**cfg, "mask_token_id": mask_id})

    if model_type == "Dream":
        model = Qwen2ForCausalLM.from_pretrained(str(d), config=dream_to_qwen2_config(cfg), **extra)
        do_shift = True if shift is None else shift
    elif model_type == "llada":
        from dreamtune.llada import load_llada

        model = load_llada(d, cfg, **extra)
        do_shift = False if shift is None else shift  # LLaDA scores position i from output i
    else:
        hf_cfg = AutoConfig.for_model(**cfg)  # from the dict: transformers never reads an auto_map here
        hf_cfg.is_causal = False
        model = AutoModelForCausalLM.from_pretrained(str(d), config=hf_cfg, **extra)
        do_shift = shift if shift is not None else bool(meta.get("shift", True))
    model.config.is_causal = False

    if mask_id is None:
        mask_id = add_mask_token(model, tokenizer, d)
    check_mask_id(mask_id, model.get_input_embeddings().weight.shape[0], d)
    model.config.mask_token_id = int(mask_id)
    if device is not None:
        model.to(device)
    model.eval()
    return DiffusionLM(model=model, tokenizer=tokenizer, mask_token_id=int(mask_id), shift=do_shift,
                       source=str(path_or_id), source_dir=d)


def check_mask_id(mask_id, rows: int | None, d: Path) -> None:
    if mask_id is not None and rows is not None and not 0 <= int(mask_id) < rows:
        raise ValueError(f"mask_token_id {mask_id} is outside the embedding table ({rows} rows); fix mask_token_id in "
                         f"{d}/config.json or {META_FILE}")


def add_mask_token(model: nn.Module, tokenizer, d: Path | str = "") -> int:
    """Give an autoregressive checkpoint a mask token: reuse `<|mask|>` if the tokenizer has it, else add it.
    A newly added token's embedding rows start at the mean of the real tokens' rows (a neutral start), whether
    the table grows or the token lands on an untrained padding row (Qwen2.5's tables have spare rows)."""
    if tokenizer is None:
        raise ValueError(f"'{d}' has no mask token id and no tokenizer to add one to; pass mask_token_id=... or add tokenizer files")
    tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tid is not None and tid != tokenizer.unk_token_id:
        return int(tid)
    n_real = len(tokenizer)  # rows of real tokens, before the new one
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tid >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(tid + 1, mean_resizing=False)
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight is not tables[0]:
            tables.append(out.weight)
        for w in tables:
            w[tid] = w[:n_real].mean(0)
    return int(tid)


# ----------------------------------------------------------------------------------------------- tiny models


def tiny_config(vocab_size: int, arch: str = "qwen2", hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 512, **kw):
    """A small transformers config of the real architecture (Qwen2 as Dream, or Llama), bidirectional."""
    from transformers import LlamaConfig, Qwen2Config

    if arch not in ("qwen2", "llama"):
        raise ValueError(f"unknown arch '{arch}'; use qwen2 or llama")
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=intermediate_size, max_position_embeddings=max_positions,
              tie_word_embeddings=False, rms_norm_eps=1e-6, **kw)
    cfg.is_causal = False
    return cfg


def new_model(config, tokenizer=None, mask_token_id: int | None = None, shift: bool = True, seed: int = 0,
              dtype=torch.float32) -> DiffusionLM:
    """A randomly initialised diffusion LM (tests, the quickstart, benchmarks). Initialisation is seeded."""
    from transformers import AutoModelForCausalLM

    config.is_causal = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if mask_token_id is None:
        if tokenizer is None:
            raise ValueError("new_model needs a tokenizer or a mask_token_id")
        mask_token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    model.config.mask_token_id = mask_token_id
    return DiffusionLM(model=model.eval(), tokenizer=tokenizer, mask_token_id=int(mask_token_id), shift=shift, source="random")
