"""Tiny, self-contained pieces for tests, the quickstart and benchmarks: a character-level tokenizer with
Dream's special tokens and a ChatML chat template, and a small Dream-architecture model built on it.

Nothing here downloads anything. Real runs use a real tokenizer (Dream's is Qwen2's BPE).
"""

from __future__ import annotations

import string
from pathlib import Path

from dreamtune.models import DiffusionLM, new_model, tiny_config

# Dream's special tokens, in Dream's order (eos = pad = <|endoftext|>).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " \n+-*/=().,:?!'_#<>|[]{}$\\^"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A PreTrainedTokenizerFast with one token per character of `alphabet` plus Dream's special tokens.
    Characters outside the alphabet map to an unknown token, so the vocabulary stays tiny."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|beginoftext|>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|mask|>"],
    )
    fast.chat_template = CHATML
    return fast


def tiny_lm(arch: str = "qwen2", alphabet: str = DEFAULT_ALPHABET, hidden_size: int = 64, layers: int = 2,
            heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 512,
            shift: bool = True, seed: int = 0) -> DiffusionLM:
    """A random Dream-architecture (qwen2) or Llama diffusion LM over a character tokenizer."""
    tok = char_tokenizer(alphabet)
    cfg = tiny_config(len(tok), arch=arch, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                      intermediate_size=intermediate_size or 4 * hidden_size, max_positions=max_positions,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return new_model(cfg, tokenizer=tok, shift=shift, seed=seed)


def write_shards(model, out: Path, weight_map: dict[str, str]) -> None:
    """The model's tensors into the safetensors shards `weight_map` names (restricted to the model's own
    parameters), and the index beside them."""
    import json

    from safetensors.torch import save_file

    sd = model.state_dict()
    names = {k: f for k, f in weight_map.items() if k in sd}
    assert set(names) == set(sd), f"the index lacks {sorted(set(sd) - set(names))[:3]}"
    for f in sorted(set(names.values())):
        save_file({k: sd[k].detach().contiguous().cpu() for k in names if names[k] == f}, str(out / f), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": names}, indent=2))


def random_download(layout: Path, out: Path, extra_files=(), shape: dict | None = None, dtype=None, device=None,
                    seed: int = 0) -> Path:
    """A Dream-format Hub download with random weights: the small files of `layout` (config.json, tokenizer
    files, shard index) and `extra_files` copied as they are, config.json's shape keys replaced by `shape`
    (None: the real shape), random weights written into the shards the layout's index names."""
    import json
    import shutil

    import torch
    from transformers import Qwen2ForCausalLM

    from dreamtune.models import dream_to_qwen2_config

    out = Path(out)
    out.mkdir(parents=True)
    for f in [*Path(layout).iterdir(), *map(Path, extra_files)]:
        shutil.copyfile(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    if shape:
        cfg.update(shape, max_window_layers=shape.get("num_hidden_layers", cfg.get("max_window_layers")))
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(dream_to_qwen2_config(cfg))
    if dtype is not None:
        model.to(dtype)
    write_shards(model, out, json.loads((Path(layout) / "model.safetensors.index.json").read_text())["weight_map"])
    return out
