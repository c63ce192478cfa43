"""Checkpoints laid out as users download them, with tiny random weights (nothing downloaded).

- `dream_download`: the real Dream-v0-Base-7B repository's small files (../shared/data/hub-layouts) plus
  the Dream tokenizer's vocab.json / merges.txt, exactly as a download holds them; only the shape keys of
  config.json are shrunk, and random weights are written into the shards the real index names.
- `qwen25_download`: a Qwen2.5-Instruct-shaped checkpoint: Qwen2's BPE without Dream's two tokens
  (151,665 tokens), a padded 152,064-row table, eos <|im_end|> 151645 and pad <|endoftext|> 151643.
- `llama3_download`: a Llama 3 Instruct-shaped checkpoint: a tokenizer.json with Llama 3's special tokens
  and a list of eos ids in config.json and generation_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dreamtune.tiny import random_download, write_shards

TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def dream_download(layout: Path, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    return random_download(layout, out, [tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"], TINY_SHAPE, seed=seed)


def _weight_map(model, shards: int = 2) -> dict[str, str]:
    names = list(model.state_dict())
    per = -(-len(names) // shards)
    return {k: f"model-{i // per + 1:05d}-of-{shards:05d}.safetensors" for i, k in enumerate(names)}


def qwen25_download(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """Qwen2's BPE (vocab.json + merges.txt) with Qwen2.5's 22 added tokens (151643..151664), saved by
    transformers as a Qwen2.5 download holds it (tokenizer.json too); a causal Qwen2 model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    src = out.parent / (out.name + "-tokenizer-src")
    src.mkdir(parents=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / f, src / f)
    tcfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    added = {k: v for k, v in tcfg["added_tokens_decoder"].items() if int(k) < 151665}  # no Dream tokens
    assert len(added) == 22
    tcfg.update(added_tokens_decoder=added, tokenizer_class="Qwen2Tokenizer", bos_token=None,
                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tcfg.pop("mask_token", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok = Qwen2Tokenizer.from_pretrained(str(src))
    assert len(tok) == 151665 and "<|mask|>" not in tok.get_vocab()
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / f, out / f)
    cfg = Qwen2Config(vocab_size=152064, bos_token_id=151643, eos_token_id=151645, pad_token_id=None,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                      **TINY_SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    write_shards(model, out, _weight_map(model))
    cfg_json = cfg.to_dict()
    cfg_json.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True,
         "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    return out


LLAMA3_SPECIALS = {"<|begin_of_text|>": 40, "<|end_of_text|>": 41, "<|start_header_id|>": 42, "<|end_header_id|>": 43,
                   "<|eom_id|>": 44, "<|eot_id|>": 45}
LLAMA3_EOS = [LLAMA3_SPECIALS["<|end_of_text|>"], LLAMA3_SPECIALS["<|eom_id|>"], LLAMA3_SPECIALS["<|eot_id|>"]]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def llama3_download(out: Path, seed: int = 0) -> Path:
    """A word-per-character tokenizer.json with Llama 3's special tokens (at small ids), tokenizer_class
    PreTrainedTokenizerFast as Llama 3's; config eos a list (end_of_text, eom, eot); tokenizer eos <|eot_id|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 ?.,+=\n")[:40]
    vocab = {c: i for i, c in enumerate(chars)} | LLAMA3_SPECIALS
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  additional_special_tokens=[k for k in LLAMA3_SPECIALS if k not in ("<|begin_of_text|>", "<|eot_id|>")])
    tok.chat_template = LLAMA3_TEMPLATE
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=len(vocab), bos_token_id=40, eos_token_id=LLAMA3_EOS, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                      max_position_embeddings=1024, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 40, "eos_token_id": LLAMA3_EOS,
                                                            "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return out


# LLaDA's special ids: mask, <|startoftext|>, <|endoftext|>, <|eot_id|> (the end of a chat turn)
MASK, BOS, EOS, EOT = 126_336, 126_080, 126_081, 126_348
LLADA_TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64)


def llada_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a LLaDA checkpoint and its shape, from LLaDA's config keys (as LLaDA's code builds them)."""
    d, heads, kv, m = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"]
    v, hd = cfg["embedding_size"], cfg["d_model"] // cfg["n_heads"]
    shapes = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
              "model.transformer.ff_out.weight": (v, d)}
    for n in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{n}."
        shapes |= {b + "attn_norm.weight": (d,), b + "q_proj.weight": (heads * hd, d), b + "k_proj.weight": (kv * hd, d),
                   b + "v_proj.weight": (kv * hd, d), b + "attn_out.weight": (d, heads * hd), b + "ff_norm.weight": (d,),
                   b + "ff_proj.weight": (m, d), b + "up_proj.weight": (m, d), b + "ff_out.weight": (d, m)}
    return shapes


def llada_download(layout: Path, out: Path, seed: int = 0, shape: dict | None = None) -> Path:
    """The LLaDA layout's files with config.json's shape keys shrunk, and random weights under LLaDA's names in
    the shards the real index names them in. shape: LLaDA config keys replacing LLADA_TINY's (e.g. n_layers)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in layout.iterdir():
        shutil.copyfile(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(LLADA_TINY, **(shape or {}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in llada_shapes(cfg).items():
        if len(shape) == 1:  # norm gains near 1, distinct per module, so a swapped norm changes the logits
            sd[name] = 1 + 0.3 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) * (0.5 if "wte" in name else shape[1] ** -0.5)
    real_map = json.loads((layout / "model.safetensors.index.json").read_text())["weight_map"]
    names = {k: real_map[k] for k in sd}  # KeyError here: a name the real checkpoint does not have
    for f in sorted(set(names.values())):
        save_file({k: sd[k] for k in names if names[k] == f}, str(out / f), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": names}))
    return out
