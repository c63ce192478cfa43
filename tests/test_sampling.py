"""Sampler facts on tiny random models (CPU, seconds): Dream's loop and the fast sampler.

Run: python -m pytest tests/test_sampling.py -q
"""

from __future__ import annotations

import pytest
import torch

from dreamtune.fast_sampling import block_columns
from dreamtune.kv_forward import forward_columns
from dreamtune.engine import generate
from dreamtune.sampling_core import GenerateOutput, init_canvas
from dreamtune.tiny import tiny_lm

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=1)


@pytest.fixture(scope="module")
def lm1():
    """One layer: layer-0 K/V depend only on token and position, so the fast sampler's cache is exact."""
    return tiny_lm(layers=1, seed=2)


def left_pad(lm, texts):
    """Left-padded [B, P] ids and 0/1 mask (pads are eos, as Dream's)."""
    enc = [lm.tokenizer.encode(t) for t in texts]
    width = max(map(len, enc))
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    return ids, mask


PROMPTS = ["What is 2+3?", "Hi", "A much longer prompt, to pad the others a lot: 1 2 3"]


def gen(lm, ids, mask=None, seed=0, **kw):
    kw.setdefault("max_new_tokens", 24)
    if kw.get("alg", "origin") != "fast":  # the fast sampler has no steps: it reveals by confidence
        kw.setdefault("steps", 8)
    return generate(lm, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("alg", DREAM_ALGS + ("fast",))
def test_prompt_kept_and_no_mask_left(lm, alg):
    ids, mask = left_pad(lm, PROMPTS)
    out = gen(lm, ids, mask, alg=alg, temperature=0.7, top_p=0.9, top_k=20)
    assert isinstance(out, GenerateOutput)
    assert out.sequences.shape == (3, ids.shape[1] + 24)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert not (out.sequences == lm.mask_token_id).any()
    assert out.nfe >= 1


def expected_counts(n: int, steps: int, eps: float = 1e-3) -> list[int]:
    """Dream's schedule written out independently: float32 grid, int(n * (1 - s/t)), all at the end."""
    grid = torch.linspace(1, eps, steps + 1)
    counts, left = [], torch.tensor(float(n))
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        k = int(left) if i == steps - 1 else int(left * (1 - s / t))
        counts.append(k)
        left = left - k
    return counts


def revealed_per_step(out, prompt_len, start_canvas):
    prev, counts = start_canvas, []
    for canvas in out.history:
        changed = canvas[:, prompt_len:] != prev[:, prompt_len:]
        assert (prev[:, prompt_len:][changed] == 4).all(), "a step rewrote an already revealed position"
        counts.append(changed.sum(-1))
        prev = canvas
    return torch.stack(counts, 1)  # [B, steps]


@pytest.mark.parametrize("alg", CONFIDENCE_ALGS)
@pytest.mark.parametrize("n,steps", [(24, 24), (24, 8), (24, 5), (12, 20)])
def test_reveal_counts_follow_schedule(lm, alg, n, steps):
    ids, mask = left_pad(lm, PROMPTS[:2])
    out = gen(lm, ids, mask, alg=alg, max_new_tokens=n, steps=steps, return_history=True)
    assert len(out.history) == steps
    start, _, _ = init_canvas(lm, ids, mask, n)
    counts = revealed_per_step(out, ids.shape[1], start)
    want = expected_counts(n, steps)
    assert counts.tolist() == [want, want]
    assert out.nfe == sum(k > 0 for k in want)  # steps that reveal nothing skip the forward pass
    if steps == n:  # Dream's known shape of this schedule
        assert want[0] == 0 and want[-1] > 1


def test_reveal_counts_alg_temp(lm):
    ids, mask = left_pad(lm, PROMPTS[:2])
    out = gen(lm, ids, mask, alg="entropy", alg_temp=0.5, temperature=0.3, return_history=True)
    start, _, _ = init_canvas(lm, ids, mask, 24)
    assert revealed_per_step(out, ids.shape[1], start).tolist() == [expected_counts(24, 8)] * 2


def test_origin_reveals_everything_by_the_last_step(lm):
    ids, mask = left_pad(lm, PROMPTS)
    out = gen(lm, ids, mask, alg="origin", max_new_tokens=32, steps=4, return_history=True)
    start, _, _ = init_canvas(lm, ids, mask, 32)
    counts = revealed_per_step(out, ids.shape[1], start)
    assert (counts.sum(1) == 32).all()
    assert out.nfe <= 4


@pytest.mark.parametrize("alg,extra", [("origin", {}), ("entropy", {"alg_temp": 0.3}),
                                       ("maskgit_plus", {}), ("fast", {"threshold": 0.05})])
def test_same_generator_same_output(lm, alg, extra):
    ids, mask = left_pad(lm, PROMPTS)
    a = gen(lm, ids, mask, seed=7, alg=alg, temperature=1.0, **extra)
    b = gen(lm, ids, mask, seed=7, alg=alg, temperature=1.0, **extra)
    c = gen(lm, ids, mask, seed=8, alg=alg, temperature=1.0, **extra)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


@pytest.mark.parametrize("alg,extra", [("maskgit_plus", {}), ("topk_margin", {}), ("entropy", {}),
                                       ("fast", {"block_length": 8}),
                                       ("fast", {"block_length": 8, "dual_cache": True}),
                                       ("fast", {"block_length": 8, "threshold": 0.02})])
def test_batched_left_padding_equals_one_by_one(lm, alg, extra):
    ids, mask = left_pad(lm, PROMPTS)
    assert (mask == 0).sum() > 20  # non-trivial padding
    batched = gen(lm, ids, mask, alg=alg, **extra).sequences
    width = ids.shape[1]
    for i, text in enumerate(PROMPTS):
        one = torch.tensor([lm.tokenizer.encode(text)])
        single = gen(lm, one, alg=alg, **extra).sequences
        assert torch.equal(batched[i, width:], single[0, one.shape[1]:]), (alg, i)


def test_steps_above_max_new_tokens(lm):
    ids, mask = left_pad(lm, PROMPTS[:1])
    out = gen(lm, ids, mask, alg="entropy", max_new_tokens=6, steps=20)
    assert not (out.sequences == lm.mask_token_id).any()
    assert out.nfe <= 6  # at most one forward per revealed token: the rest reveal nothing and are skipped


def test_bad_arguments(lm):
    ids, mask = left_pad(lm, PROMPTS[:2])
    with pytest.raises(ValueError, match="unknown alg"):
        gen(lm, ids, mask, alg="greedy")
    with pytest.raises(ValueError, match="left-padded"):
        gen(lm, ids, mask.flip(1), alg="entropy")
    with pytest.raises(ValueError, match="top_p"):
        gen(lm, ids, mask, alg="entropy", top_p=1.5)
    with pytest.raises(ValueError, match="threshold"):
        gen(lm, ids, mask, alg="fast", threshold=0.0)


# --------------------------------------------------------------------------------------- fast sampler


def test_fast_threshold_one_reveals_the_most_confident_position_per_step(lm):
    ids, mask = left_pad(lm, PROMPTS[:2])
    p = ids.shape[1]
    out = gen(lm, ids, mask, alg="fast", max_new_tokens=16, block_length=8, threshold=1.0, use_cache=False,
              stop_at_eos=False, return_history=True)
    assert out.nfe == 16 and len(out.history) == 16
    canvas, keys, pos = init_canvas(lm, ids, mask, 16)
    head = lm.model.get_output_embeddings()
    for step, after in enumerate(out.history):
        start = p + 8 * (step // 8)
        changed = after != canvas
        assert changed.sum(-1).tolist() == [1, 1]
        # the revealed position is the most confident masked position of the current block, with its argmax
        h = lm.hidden_states(canvas, keys, pos)[:, start - 1:start + 7]
        probs = torch.softmax(head(h).float(), -1)  # [B, 8, V]
        conf, tok = probs.max(-1)
        conf = conf.masked_fill(canvas[:, start:start + 8] != lm.mask_token_id, -1)
        best = conf.argmax(-1)
        for row in range(2):
            col = changed[row].nonzero().item()
            assert col == start + best[row].item()
            assert after[row, col] == tok[row, best[row]]
        canvas = after


@pytest.mark.parametrize("dual", [False, True])
def test_fast_threshold_one_with_cache_reveals_one_per_step(lm, dual):
    ids, mask = left_pad(lm, PROMPTS)
    out = gen(lm, ids, mask, alg="fast", max_new_tokens=24, block_length=8, threshold=1.0, dual_cache=dual,
              stop_at_eos=False, return_history=True)
    start, _, _ = init_canvas(lm, ids, mask, 24)
    assert out.nfe == 24
    assert (revealed_per_step(out, ids.shape[1], start) == 1).all()


def test_fast_low_threshold_reveals_a_block_per_step(lm):
    ids, mask = left_pad(lm, PROMPTS[:2])
    out = gen(lm, ids, mask, alg="fast", max_new_tokens=32, block_length=8, threshold=1e-6, stop_at_eos=False)
    assert out.nfe == 4


def near_tie(lm, ids, mask, canvas, max_new_tokens, block_length, tol=1e-5) -> bool:
    """Whether the next reveal of the threshold sampler (threshold 0.9, greedy) on `canvas` is a near tie in
    the uncached model: two masked positions of the current block, or the two best tokens of the most
    confident position, within `tol` of each other. Rounding may decide such a reveal either way."""
    from dreamtune.sampling_core import token_probs

    x0, keys, pos = init_canvas(lm, ids, mask, max_new_tokens)
    p = ids.shape[1]
    with torch.no_grad():
        h = lm.hidden_at(canvas, keys, pos)  # [B, L, H], shifted
        probs = token_probs(lm.model.get_output_embeddings()(h), 0.0, None, None)  # [B, L, V]
    probs[..., lm.mask_token_id] = 0
    masked = canvas == lm.mask_token_id
    first = int(masked[:, p:].float().argmax(-1)[masked[:, p:].any(-1)].min()) + p
    start = p + (first - p) // block_length * block_length
    block = slice(start, min(start + block_length, canvas.shape[1]))
    for b in range(canvas.shape[0]):
        conf = probs[b, block].max(-1).values.masked_fill(~masked[b, block], -1.0)  # [K]
        if int(masked[b, block].sum()) >= 2 and float(conf.topk(2).values.diff().abs()) < tol:
            return True
        top2 = probs[b, block][conf.argmax()].topk(2).values
        if float(top2[0] - top2[1]) < tol:
            return True
    return False


def assert_agree_until_a_near_tie(lm, ids, mask, off, on, max_new_tokens: int, block_length: int) -> None:
    """The uncached and cached runs' canvases are equal step by step, until a step whose reveal is a near tie
    in the uncached model (rounding may decide it either way); with none, the whole runs are equal."""
    before = init_canvas(lm, ids, mask, max_new_tokens)[0]
    for step, (a, b) in enumerate(zip(off.history, on.history)):
        if not torch.equal(a, b):
            assert near_tie(lm, ids, mask, before, max_new_tokens, block_length), f"cached run differs at step {step} without a tie"
            return
        before = a
    assert torch.equal(on.sequences, off.sequences) and on.nfe == off.nfe


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dual", [False, True])
def test_fast_cache_on_off_same_tokens_where_exact(lm1, blocks, dual):
    """A 1-layer model makes the approximate cache exact, for any number of blocks: this checks the cache's
    columns, positions, shift and pad masks. (A deeper bidirectional model's prefix K/V depend on the
    block's tokens, so even one block is not exact there.) The cached and uncached kernels round
    differently, so the two runs must agree step by step until a reveal that is a near tie, if any."""
    ids, mask = left_pad(lm1, PROMPTS)
    kw = dict(alg="fast", max_new_tokens=8 * blocks, block_length=8, stop_at_eos=False, return_history=True)
    off = gen(lm1, ids, mask, use_cache=False, **kw)
    on = gen(lm1, ids, mask, use_cache=True, dual_cache=dual, **kw)
    assert_agree_until_a_near_tie(lm1, ids, mask, off, on, 8 * blocks, 8)


@pytest.mark.parametrize("dual", [False, True])
def test_cached_window_matches_full_forward_on_an_unchanged_canvas(lm, dual):
    """On a 2-layer model: build the block's cache, then run the window against it without changing the
    canvas; the block's hidden states (after the shift) equal the full forward's, and the cache does not grow."""
    ids, mask = left_pad(lm, PROMPTS)
    x, keys, pos = init_canvas(lm, ids, mask, 24)
    p = ids.shape[1]
    x[:, p:p + 8] = torch.randint(10, 60, (3, 8))  # a finished first block
    start, end = p + 8, p + 16
    full = lm.hidden_states(x, keys, pos)[:, start - 1:end - 1]  # transformers' forward of the whole canvas
    window, cached = block_columns(start, end, x.shape[1], dual, x.device)
    cols = torch.cat([cached, window])
    first, kv = forward_columns(lm.model, x[:, cols], pos[:, cols], keys[:, cols], return_kv=True)
    kv = [(k[:, :, :len(cached)], v[:, :, :len(cached)]) for k, v in kv]
    again = forward_columns(lm.model, x[:, window], pos[:, window], keys[:, cols], kv)
    torch.testing.assert_close(first[:, len(cached):][:, :8], full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[:, :8], full, atol=1e-5, rtol=1e-4)


def test_fast_stops_after_an_all_eos_block(lm):
    eos_lm = tiny_lm(seed=1)
    with torch.no_grad():
        eos_lm.model.get_output_embeddings().weight.zero_()  # uniform probabilities: argmax is id 0 = eos
    assert eos_lm.tokenizer.eos_token_id == 0
    ids, mask = left_pad(eos_lm, PROMPTS[:2])
    out = gen(eos_lm, ids, mask, alg="fast", max_new_tokens=32, block_length=8)
    assert out.nfe == 8  # one block, one position per step; then the rest is filled with eos
    assert (out.sequences[:, ids.shape[1]:] == 0).all()
    full = gen(eos_lm, ids, mask, alg="fast", max_new_tokens=32, block_length=8, stop_at_eos=False)
    assert full.nfe == 32
