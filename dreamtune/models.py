"""The model layer: any supported checkpoint as a masked diffusion LM on transformers' own classes.

A diffusion LM here is a plain transformers `Qwen2ForCausalLM` / `LlamaForCausalLM` (or another decoder
whose attention honours `config.is_causal`) with `config.is_causal = False`, wrapped by `DiffusionLM`,
which knows two more facts: the mask token id, and whether logits shift (Dream keeps the autoregressive
alignment, so position i is scored from the output at i-1; LLaDA does not shift).

What loads (`load(path_or_id)`):
- a Dream checkpoint (config.json `model_type: "Dream"`): its config is mapped to Qwen2 and its weights,
  which already use Qwen2's parameter names, load without remote code;
- a dreamtune export (an HF directory with `dreamtune.json` beside config.json);
- any Hugging Face Qwen2/Llama-family causal LM, adapted as Dream was made from Qwen2.5: attention made
  bidirectional, shift on, and a `<|mask|>` token added to the tokenizer and the embeddings if missing.

What is written: `save_hf` (a directory dreamtune and `AutoModelForCausalLM` load) and `save_dream` (a
Dream-format directory: model_type "Dream", Dream's config keys, the same parameter names).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dreamtune.kv_forward import GraphCache

from dreamtune.atomic import replace_dir, temp_dir_beside

MASK_TOKEN = "<|mask|>"
META_FILE = "dreamtune.json"
# model_type -> how to treat it. Dream is Qwen2 under another name; the rest load through Auto classes.
DECODER_TYPES = ("qwen2", "llama", "mistral", "qwen3")
SUPPORTED_TYPES = ("Dream",) + DECODER_TYPES

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
    # the fast sampler's CUDA graphs (made with the object, so concurrent generations share one lock)
    graph_cache: GraphCache = field(default_factory=GraphCache, repr=False, compare=False)

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


def resolve_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (weights, config, tokenizer) to the HF cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    looks_local = s.startswith((".", "/", "~")) or s.count("/") != 1 or p.exists()
    if looks_local:
        if p.exists():
            raise NotADirectoryError(f"'{s}' is a file; pass the model's directory (the one holding config.json)")
        raise FileNotFoundError(f"model directory '{s}' does not exist; pass a local model directory or a hub id like Dream-org/Dream-v0-Base-7B")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            s, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"]
        )
    except Exception as e:  # offline, unknown repo, gated repo: all mean "use a local directory"
        raise ValueError(
            f"could not fetch '{s}' from the Hugging Face Hub ({type(e).__name__}); if this machine is offline, "
            f"download the model elsewhere (huggingface-cli download {s} --local-dir DIR) and pass that directory"
        ) from None
    return Path(local)


def read_config(d: Path) -> dict:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"'{d}' has no config.json, so it is not a model directory; pass the directory that holds config.json and the weights")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}); re-download or re-export the model") from None


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted(names)}")
    return names[dtype]


def load_tokenizer(d: Path):
    """The tokenizer in `d`, or None if it holds no tokenizer files. Dream's own tokenizer_config names a
    remote-code DreamTokenizer; its encoding is Qwen2's, so we fall back to Qwen2TokenizerFast."""
    has_files = any((d / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_files:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tcfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    if tcfg.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast") and (d / "tokenizer.json").exists():
        # a generic tokenizer.json (dreamtune's tiny char tokenizer, say): AutoTokenizer would pick the model
        # type's tokenizer class (Qwen2Tokenizer), whose pre-tokenizer changes how text splits
        return PreTrainedTokenizerFast.from_pretrained(str(d))
    try:
        # Never run remote code (and never prompt for it on stdin).
        return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except Exception:
        if (d / "vocab.json").exists() and (d / "merges.txt").exists():
            from transformers import Qwen2TokenizerFast

            return Qwen2TokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"),
                                      tokenizer_file=str(d / "tokenizer.json") if (d / "tokenizer.json").exists() else None)
        raise


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
            f"{', '.join(SUPPORTED_TYPES)} (LLaDA checkpoints: convert to a llama directory first)"
        )
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else {}
    tdtype = _dtype(dtype)
    # "auto": transformers' own choice (sdpa where it can)
    extra = {"attn_implementation": attn_implementation} if attn_implementation not in (None, "auto") else {}
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((d / w).exists() for w in weights):
        raise FileNotFoundError(f"{d} has a config but no weights (none of {', '.join(weights)}); point at a "
                                f"complete model directory, e.g. RUN/checkpoint-final")
    if tdtype is not None:
        extra["dtype"] = tdtype
    tokenizer = load_tokenizer(d)

    if model_type == "Dream":
        qcfg = dream_to_qwen2_config(cfg)
        model = Qwen2ForCausalLM.from_pretrained(str(d), config=qcfg, **extra)
        mask_id = mask_token_id or cfg.get("mask_token_id")
        do_shift = True if shift is None else shift
    else:
        hf_cfg = AutoConfig.from_pretrained(str(d), trust_remote_code=False)
        hf_cfg.is_causal = False
        model = AutoModelForCausalLM.from_pretrained(str(d), config=hf_cfg, **extra)
        mask_id = mask_token_id or meta.get("mask_token_id") or getattr(hf_cfg, "mask_token_id", None)
        do_shift = shift if shift is not None else bool(meta.get("shift", True))
    model.config.is_causal = False

    if mask_id is None:
        mask_id = add_mask_token(model, tokenizer, d)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Dream: pad == eos, and trailing pads are trained targets
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if not 0 <= int(mask_id) < vocab_rows:
        raise ValueError(f"mask_token_id {mask_id} is outside the embedding table ({vocab_rows} rows); fix mask_token_id in {d}/config.json or {META_FILE}")
    model.config.mask_token_id = int(mask_id)
    if device is not None:
        model.to(device)
    model.eval()
    return DiffusionLM(model=model, tokenizer=tokenizer, mask_token_id=int(mask_id), shift=do_shift, source=str(path_or_id))


def add_mask_token(model: nn.Module, tokenizer, d: Path | str = "") -> int:
    """Give an autoregressive checkpoint a mask token: reuse `<|mask|>` if the tokenizer has it, else add it
    and grow the embeddings by one row initialised to the mean embedding (a neutral start)."""
    if tokenizer is None:
        raise ValueError(f"'{d}' has no mask token id and no tokenizer to add one to; pass mask_token_id=... or add tokenizer files")
    tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
        tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    rows = model.get_input_embeddings().weight.shape[0]
    if tid >= rows:
        with torch.no_grad():
            mean_in = model.get_input_embeddings().weight.mean(0)
            model.resize_token_embeddings(tid + 1, mean_resizing=False)
            model.get_input_embeddings().weight[rows:] = mean_in
            out = model.get_output_embeddings()
            if out is not None and out.weight.shape[0] > rows and out.weight is not model.get_input_embeddings().weight:
                out.weight[rows:] = out.weight[:rows].mean(0)
    return int(tid)


# ----------------------------------------------------------------------------------------------- saving


def _atomic_dir(out: Path):
    """A temporary directory beside `out`; the caller renames it into place when complete."""
    return temp_dir_beside(out)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (FSDP2 keeps the module itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_hf(lm: DiffusionLM, out, dtype=torch.bfloat16, state_dict: dict | None = None) -> Path:
    """Write an HF directory (safetensors in `dtype`, config with is_causal false, tokenizer, dreamtune.json).

    state_dict: plain HF keys (e.g. gathered from an FSDP model, LoRA merged); default: the model's own.
    The weights are written through a skeleton on the meta device, so no second copy is allocated."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    config = unwrap(lm.model).config
    config.is_causal = False
    sd = state_dict if state_dict is not None else unwrap(lm.model).state_dict()
    sd = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    tmp = _atomic_dir(out)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        skeleton.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg["is_causal"] = False
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps({"mask_token_id": lm.mask_token_id, "shift": lm.shift}, indent=2))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_dream(lm: DiffusionLM, out, dtype=torch.bfloat16, state_dict: dict | None = None) -> Path:
    """Write a Dream-format directory: config.json with model_type "Dream", architectures ["DreamModel"] and
    Dream's keys; weights under the same names (Dream's modules are named as Qwen2's). Dream's remote code
    (configuration_dream.py, modeling_dream.py from the Dream-org hub repo) can be dropped beside it; the
    config's auto_map already points at those files."""
    if not lm.shift:
        raise ValueError("a Dream-format export needs a shifting model (Dream scores position i from output i-1); this model does not shift")
    c = unwrap(lm.model).config
    if c.model_type != "qwen2":
        raise ValueError(f"a Dream-format export needs a Qwen2-architecture model; this one is {c.model_type}; use save_hf instead")
    out = save_hf(lm, out, dtype=dtype, state_dict=state_dict)
    tok = lm.tokenizer
    dream_cfg = {k: getattr(c, k) for k in _DREAM_TO_QWEN2_KEYS if k not in ("rope_theta", "rope_scaling") and hasattr(c, k)}
    rope = dict(getattr(c, "rope_parameters", None) or {})
    dream_cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    dream_cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    dream_cfg.update(
        model_type="Dream",
        architectures=["DreamModel"],
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        mask_token_id=lm.mask_token_id,
        pad_token_id=tok.pad_token_id if tok is not None else dream_cfg.get("pad_token_id"),
        bos_token_id=(tok.convert_tokens_to_ids("<|beginoftext|>") if tok is not None and "<|beginoftext|>" in tok.get_vocab() else dream_cfg.get("bos_token_id")),
        eos_token_id=tok.eos_token_id if tok is not None else dream_cfg.get("eos_token_id"),
        torch_dtype=str(dtype).replace("torch.", ""),
        use_cache=False,
    )
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(dream_cfg, indent=2))
    os.replace(tmp, out / "config.json")
    return out


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
