"""LLaDA's own checkpoint format (GSAI-ML/LLaDA-8B-Base / -Instruct) on transformers' Llama, both ways.

    lm = dreamtune.load("GSAI-ML/LLaDA-8B-Instruct")      # models.load dispatches here for model_type "llada"
    save_llada(lm, "export-dir")                          # or: dreamtune export SRC --out DIR --format llada

LLaDA is a Llama decoder with bidirectional attention, written in LLaDA's own (OLMo-derived) code. Its
config.json uses that code's keys (d_model, n_layers, ...) and its weights that code's names
(model.transformer.blocks.N.*); the config's auto_map points at remote code, which dreamtune never runs.
This module maps the config keys to a transformers `LlamaConfig` (is_causal False) and renames the tensors
as they stream out of the shards, so the model is transformers' own `LlamaForCausalLM`; LLaDA does not
shift (position i is scored from output i) and its mask token id comes from the config (126336).

`save_llada` writes the reverse: LLaDA's config keys and parameter names, so LLaDA's code and everything
built on it load a model tuned here. Anything LLaDA's format cannot express (biases, RoPE scaling, a
shifting model) is refused with the reason, never written approximately.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# LLaDA block module -> the transformers Llama module that computes the same thing.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",  # the activated half of the gated MLP
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
TOP_NAMES = {"model.transformer.wte": "model.embed_tokens", "model.transformer.ln_f": "model.norm",
             "model.transformer.ff_out": "lm_head"}

# The settings of LLaDA-8B's config.json that describe the architecture this mapping is exact for. A
# checkpoint with another value is a model that transformers' Llama does not compute.
REQUIRED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
            "alibi": False, "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False,
            "input_emb_norm": False, "scale_logits": False, "layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "clip_qkv": None}
# What an export writes besides the shapes and ids: LLaDA-8B's own values, so LLaDA's code builds the
# same modules (auto_map: LLaDA's remote code, to be put beside the export by whoever runs it).
EXPORT_DEFAULTS = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    **{k: v for k, v in REQUIRED.items() if k != "clip_qkv"},
    "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm_with_affine": True,
    "block_group_size": 1, "embedding_dropout": 0.0, "flash_attention": False, "init_cutoff_factor": None,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "mlp_ratio": 4, "multi_query_attention": None,
    "precision": "amp_bf16", "residual_dropout": 0.0, "rope_full_precision": True, "use_cache": False,
}


# ----------------------------------------------------------------------------------------------- names


def to_hf_name(name: str) -> str:
    """LLaDA's parameter name -> transformers Llama's (model.transformer.blocks.3.attn_out.weight ->
    model.layers.3.self_attn.o_proj.weight). ValueError for a name outside LLaDA's format."""
    module, _, leaf = name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{leaf}"
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)", module)
    if m and m[2] in BLOCK_NAMES:
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.{leaf}"
    raise ValueError(f"'{name}' is not a parameter of LLaDA's format (model.transformer.wte / blocks.N.* / ln_f / ff_out)")


def to_llada_name(name: str) -> str:
    """transformers Llama's parameter name -> LLaDA's (the inverse of to_hf_name)."""
    module, _, leaf = name.rpartition(".")
    top = {v: k for k, v in TOP_NAMES.items()}
    if module in top:
        return f"{top[module]}.{leaf}"
    block = {v: k for k, v in BLOCK_NAMES.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m[2] in block:
        return f"model.transformer.blocks.{m[1]}.{block[m[2]]}.{leaf}"
    raise ValueError(f"the model has a parameter '{name}' that LLaDA's format has no place for")


def key_mapping() -> dict[str, str]:
    """LLaDA names -> Llama names as the anchored regexes transformers' from_pretrained(key_mapping=) applies
    while it reads the shards (no second copy of the weights in memory)."""
    mapping = {rf"^{re.escape(k)}\.": f"{v}." for k, v in TOP_NAMES.items()}
    mapping.update({rf"^model\.transformer\.blocks\.(\d+)\.{k}\.": rf"model.layers.\1.{v}." for k, v in BLOCK_NAMES.items()})
    return mapping


# ----------------------------------------------------------------------------------------------- configs


def llama_config(cfg: dict, where: str = "config.json"):
    """LLaDA's config.json (a dict) as a transformers LlamaConfig with bidirectional attention."""
    from transformers import LlamaConfig

    for key, want in REQUIRED.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"{where} has {key} {cfg[key]!r}; dreamtune reads LLaDA checkpoints with {key} {want!r} "
                             f"(LLaDA-8B's architecture) only")
    missing = [k for k in ("d_model", "n_layers", "n_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}, which a LLaDA config holds; re-download the model")
    heads = int(cfg["n_heads"])
    kv_heads = 1 if cfg.get("multi_query_attention") else int(cfg.get("n_kv_heads") or heads)
    hidden = int(cfg["d_model"])
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    lcfg = LlamaConfig(
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),  # rows of the table (may exceed the tokenizer)
        hidden_size=hidden,
        intermediate_size=int(cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * hidden),
        num_hidden_layers=int(cfg["n_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=float(cfg.get("init_std", 0.02)),
        **ids,
    )
    lcfg.is_causal = False
    lcfg.mask_token_id = cfg.get("mask_token_id")
    return lcfg


def llada_config(config, ids: dict, dtype: torch.dtype) -> dict:
    """A transformers Llama config (and the special ids) as LLaDA's config.json. ValueError for what LLaDA's
    format cannot express."""
    if config.model_type != "llama":
        raise ValueError(f"a LLaDA-format export needs a Llama-architecture model; this one is {config.model_type}; "
                         f"export it with --format hf instead")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("this model has attention or MLP biases, which LLaDA's format has none of; export it with --format hf")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"this model uses RoPE scaling ({rope.get('rope_type')}), which LLaDA's format cannot express; "
                         f"export it with --format hf")
    if config.hidden_act != "silu":
        raise ValueError(f"this model's MLP activation is {config.hidden_act}; LLaDA's format has silu only")
    kv = config.num_key_value_heads or config.num_attention_heads
    out = dict(EXPORT_DEFAULTS)
    out.update(
        d_model=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=kv, mlp_hidden_size=config.intermediate_size, embedding_size=config.vocab_size,
        vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rms_norm_eps=config.rms_norm_eps, weight_tying=bool(config.tie_word_embeddings),
        init_std=config.initializer_range, torch_dtype=str(dtype).replace("torch.", ""),
    )
    out.update({k: v for k, v in ids.items() if v is not None})
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- load / save


def load_llada(d: Path, cfg: dict, **extra):
    """LLaDA's weights from directory `d` (config `cfg`) in a transformers LlamaForCausalLM, is_causal False.
    `extra`: from_pretrained's keyword arguments (dtype, attn_implementation, generation_config)."""
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(d), config=llama_config(cfg, f"{d}/config.json"),
                                                   key_mapping=key_mapping(), output_loading_info=True, **extra)
    wrong = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(str(m) for m in info["mismatched_keys"])
    if wrong:  # transformers would leave missing tensors randomly initialised: never load that silently
        raise ValueError(f"{d} does not hold LLaDA's parameters for its config.json ({len(wrong)} missing, unexpected or "
                         f"misshapen, e.g. {wrong[0]}); re-download the model")
    model.config.is_causal = False
    return model


def llada_state_dict(sd: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Llama state dict -> LLaDA's names (a tied output head is the embedding table: not written twice)."""
    return {to_llada_name(k): v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
