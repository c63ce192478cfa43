"""dreamtune.kv_forward: the fast sampler's own decoder forward equals transformers' on tiny models of every
supported architecture, with left padding, and against a K/V cache of the other columns."""

from __future__ import annotations

import pytest
import torch

from dreamtune.kv_forward import GraphCache, forward_columns, supports
from dreamtune.models import new_model, tiny_config
from dreamtune.engine import generate
from dreamtune.sampling_core import init_canvas


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch: str, seed: int = 0):
    """A 3-layer random bidirectional model of `arch` (GQA: 4 heads, 2 KV heads), mask id = vocab - 1."""
    if arch == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256,
                          tie_word_embeddings=False)
        cfg.is_causal = False
    elif arch == "llama3-rope":  # Llama with the llama3 rope scaling (the rotary module does the scaling)
        cfg = tiny_config(96, arch="llama", layers=3, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        cfg = tiny_config(96, arch=arch, layers=3)
    return new_model(cfg, tokenizer=None, mask_token_id=95, shift=True, seed=seed).to(torch.float32)


def canvas(lm, seed: int = 0):
    """Three left-padded rows of random tokens plus 12 masks: (x [3, L], keys [3, L] bool, pos [3, L])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return init_canvas(lm, ids, mask, 12)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "llama3-rope"])
def test_forward_columns_equals_transformers(arch):
    lm = make(arch)
    assert supports(lm.model)
    x, keys, pos = canvas(lm)
    ref = lm.hidden_states(x, keys, pos)  # [B, L, H], transformers' forward
    ours = forward_columns(lm.model, x, pos, keys)
    real = keys  # pads are never attended and never read: compare real positions only
    torch.testing.assert_close(ours[real], ref[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_window_against_cache_equals_full_forward(arch):
    """K/V of the other columns from a forward of the same canvas: the window's hidden states are exact."""
    lm = make(arch, seed=1)
    x, keys, pos = canvas(lm, seed=1)
    full = forward_columns(lm.model, x, pos, keys)  # [B, L, H]
    window = torch.arange(11, 17)
    cached = torch.cat([torch.arange(0, 11), torch.arange(17, x.shape[1])])  # prefix and suffix (dual cache)
    cols = torch.cat([cached, window])
    first, kv = forward_columns(lm.model, x[:, cols], pos[:, cols], keys[:, cols], return_kv=True)
    kv = [(k[:, :, :len(cached)], v[:, :, :len(cached)]) for k, v in kv]
    assert kv[0][0].shape == (3, 2, len(cached), 16)
    again = forward_columns(lm.model, x[:, window], pos[:, window], keys[:, cols], kv)
    torch.testing.assert_close(first[:, len(cached):], full[:, window], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again, full[:, window], atol=2e-5, rtol=1e-4)


def test_graph_cache_runs_eagerly_on_cpu():
    lm = make("qwen2")
    x, keys, pos = canvas(lm)
    cache = GraphCache()
    for _ in range(3):  # a shape seen again would be captured on a GPU; on a CPU it always runs eagerly
        torch.testing.assert_close(cache.run(lm.model, x, pos, keys), forward_columns(lm.model, x, pos, keys))
    assert not cache.graphs


def test_sliding_window_mistral_is_not_supported():
    """Mistral keeps its window in the config only; forward_columns attends to everything, so it must refuse."""
    from transformers import MistralConfig

    def mistral(window):
        cfg = MistralConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                            sliding_window=window)
        return new_model(cfg, tokenizer=None, mask_token_id=95).model

    assert not supports(mistral(4))
    assert supports(mistral(None))


def test_unsupported_decoder_needs_use_cache_false():
    from transformers import GPT2Config, GPT2LMHeadModel

    from dreamtune.models import DiffusionLM

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=49, shift=True)
    assert not supports(model)
    ids = torch.randint(1, 40, (1, 5))
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(lm, ids, max_new_tokens=4, alg="fast", block_length=4)
