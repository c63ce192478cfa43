"""The fast sampler on LLaDA (a model that does not shift): with one layer its KV cache is exact, so cached and
uncached runs agree (rounding may flip a near tie, nothing else); its early stop ends on LLaDA's stop ids
(eos <|endoftext|> 126081, end of turn <|eot_id|> 126348) and on nothing else.

    python -m pytest -q tests/test_llada_fast.py
"""

from __future__ import annotations

import pytest
import torch

from dreamtune import models
from dreamtune.engine import generate
from tests._hub_checkpoints import BOS, EOS, EOT, llada_download
from tests.conftest import shared_or_skip
from tests.test_sampling import assert_agree_until_a_near_tie, left_pad

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is 2+3?", "Hi", "A much longer prompt, to pad the others a lot: 1 2 3"]


@pytest.fixture(scope="module")
def llada1(tmp_path_factory):
    """A 1-layer LLaDA-format checkpoint: layer-0 K/V depend only on token and position, so the cache is exact."""
    d = llada_download(shared_or_skip("hub-layouts", "llada-8b-instruct"), tmp_path_factory.mktemp("hub") / "llada1",
                       seed=2, shape={"n_layers": 1})
    lm = models.load(d)
    assert lm.shift is False and lm.model.config.num_hidden_layers == 1
    return lm


def fast(lm, ids, mask, **kw):
    return generate(lm, ids, mask, alg="fast", generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dual", [False, True])
def test_fast_cache_on_off_same_tokens_on_llada(llada1, blocks, dual):
    """The cached and uncached kernels round differently, so the runs must agree step by step until a reveal
    that is a near tie, if any. Without the shift the window's first column (the one before the block) is
    only context: a cache scoring block column c from output c - 1 would differ at the first step."""
    ids, mask = left_pad(llada1, PROMPTS)
    kw = dict(max_new_tokens=8 * blocks, block_length=8, stop_at_eos=False, return_history=True, threshold=0.9)
    off = fast(llada1, ids, mask, use_cache=False, **kw)
    on = fast(llada1, ids, mask, use_cache=True, dual_cache=dual, **kw)
    assert len(off.history) >= 2 * blocks  # a random model's confidences are low: several reveals per block
    assert_agree_until_a_near_tie(llada1, ids, mask, off, on, 8 * blocks, 8)


class Proposes(torch.nn.Module):
    """An output head under which every position proposes `token` with near certainty."""

    def __init__(self, head, token: int):
        super().__init__()
        self.head, self.token = head, token
        self.weight = head.weight  # the sampler reads the vocabulary size from it

    def forward(self, h):  # h [..., H] -> [..., V]
        logits = self.head(h).clone()
        logits[..., self.token] = 50.0
        return logits


@pytest.mark.parametrize("token,stops", [(EOS, True), (EOT, True), (BOS, False)])
def test_fast_early_stop_uses_lladas_stop_ids(llada1, token, stops):
    """Every position proposes `token` at probability ~1, so each block is revealed in one step. A block of eos
    or of end-of-turn ends the answer: the rest of the canvas is filled with pad (LLaDA's pad is its eos) and
    no more forwards run; a block of bos (not a stop token) does not."""
    assert {EOS, EOT} <= set(llada1.stop_ids) and BOS not in llada1.stop_ids
    ids, mask = left_pad(llada1, PROMPTS[:2])
    p = ids.shape[1]
    head = llada1.model.lm_head
    llada1.model.lm_head = Proposes(head, token)
    try:
        out = fast(llada1, ids, mask, max_new_tokens=32, block_length=8, threshold=0.9)
        full = fast(llada1, ids, mask, max_new_tokens=32, block_length=8, threshold=0.9, stop_at_eos=False)
    finally:
        llada1.model.lm_head = head
    assert (out.sequences[:, p:p + 8] == token).all()
    assert full.nfe == 4 and (full.sequences[:, p:] == token).all()  # one step per block, every block decoded
    if stops:
        assert out.nfe == 1 and (out.sequences[:, p + 8:] == EOS).all()
    else:
        assert out.nfe == 4 and torch.equal(out.sequences, full.sequences)
