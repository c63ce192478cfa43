"""Tiny, self-contained pieces for tests, the quickstart and benchmarks: a character-level tokenizer with
Dream's special tokens and a ChatML chat template, and a small Dream-architecture model built on it.

Nothing here downloads anything. Real runs use a real tokenizer (Dream's is Qwen2's BPE).
"""

from __future__ import annotations

import string

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
