"""Batches: truncation policies, Dream's per-batch cutoffs, padding targets, and packing (loss equal to unpacked)."""

import pytest
import torch

from dreamtune.batching import collate, pack, truncate
from dreamtune.models import document_attention_mask
from dreamtune.diffusion import diffusion_loss, position_weights

EOS = 0
EXAMPLES = [([1, 2, 3], [4, 5, EOS]), ([1, 2], [6, 7, 8, 9, EOS]), ([1, 2, 3, 4, 5], [6, EOS])]


def test_truncation_policies():
    p, r = [1, 2, 3], [4, 5, 6, 7, EOS]
    assert truncate(p, r, 8, "error") == (p, r)
    with pytest.raises(ValueError, match="data.max_length=6"):
        truncate(p, r, 6, "error", row=3)
    assert truncate(p, r, 6, "drop") is None
    assert truncate(p, r, 6, "right") == ([1, 2, 3], [4, 5, 6])
    assert truncate(p, r, 6, "left") == ([3], [4, 5, 6, 7, EOS])
    assert truncate(p, r, 4, "left") == ([], [5, 6, 7, EOS])


def test_default_pads_to_max_length_and_trains_the_pads():
    b = collate(EXAMPLES, max_length=10, pad_id=EOS)
    assert b.input_ids.shape == (3, 10)
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5, EOS, EOS, EOS, EOS, EOS]
    assert b.maskable[0].tolist() == [False] * 3 + [True] * 7  # response + trailing eos are targets
    assert b.maskable[2].tolist() == [False] * 5 + [True] * 5  # the prompt is never a target
    assert b.attention_mask is None  # the whole canvas is attended, as in generation


def test_random_cutoff_uses_one_rows_true_length():
    lengths = {len(p) + len(r) for p, r in EXAMPLES}
    seen = set()
    for s in range(30):
        b = collate(EXAMPLES, max_length=16, pad_id=EOS, cutoff_type="random", generator=torch.Generator().manual_seed(s))
        seen.add(b.input_ids.shape[1])
        assert (b.maskable.sum(1) == b.input_ids.shape[1] - torch.tensor([3, 2, 5]).clamp(max=b.input_ids.shape[1])).all()
    assert seen == lengths  # every row's length gets picked


def test_random_with_input_pad():
    for s in range(20):
        b = collate(EXAMPLES, max_length=16, pad_id=EOS, cutoff_type="random_with_input_pad",
                    generator=torch.Generator().manual_seed(s))
        P = 5  # longest prompt
        R = b.input_ids.shape[1] - P
        assert R in {3, 5, 2}
        # prompts end at the same column; left pads are not attended and never trained
        assert b.attention_mask[1].tolist()[:3] == [0, 0, 0] and b.attention_mask[1, 3:].all()
        assert not b.maskable[:, :P].any() and b.maskable[:, P:].all()
        assert b.input_ids[1, 3:5].tolist() == [1, 2]
        # position ids count from the first real token
        assert b.position_ids[1, 3].item() == 0 and b.position_ids[0, 2].item() == 0
        resp1 = [6, 7, 8, 9, EOS][:R] + [EOS] * max(0, R - 5)
        assert b.input_ids[1, P:].tolist() == resp1  # truncated or eos-filled


def test_strip_padding():
    b = collate(EXAMPLES, max_length=32, pad_id=EOS, cutoff_type="strip_padding")
    assert b.input_ids.shape[1] == 7


def test_resp_cutoff_ratio_drops_trailing_positions():
    shapes = {collate(EXAMPLES, max_length=10, pad_id=EOS, resp_cutoff_ratio=1.0,
                      generator=torch.Generator().manual_seed(s)).input_ids.shape[1] for s in range(20)}
    assert shapes == {9}  # shortest response has 2 tokens: drop 1 position
    assert collate(EXAMPLES, max_length=10, pad_id=EOS, resp_cutoff_ratio=0.0).input_ids.shape[1] == 10


def test_pack_layout():
    b = pack(EXAMPLES, max_length=13, pad_id=EOS)  # lengths 6, 7, 7: two rows
    assert b.packed and b.input_ids.shape == (2, 13)
    assert b.doc_ids[0].tolist() == [0] * 6 + [1] * 7
    assert b.position_ids[0].tolist() == list(range(6)) + list(range(7))
    assert b.doc_ids[1].tolist()[:7] == [2] * 7 and (b.doc_ids[1, 7:] == -1).all()
    assert not b.maskable[1, 7:].any()  # the row's tail is neither attended by documents nor trained
    m = document_attention_mask(b.doc_ids, "sdpa")
    assert m.shape == (2, 1, 13, 13) and not m[0, 0, 0, 6] and m[0, 0, 7, 12] and not m[1, 0, 0, 8]


@pytest.mark.parametrize("weighting, impl", [("original", "sdpa"), ("cart", "sdpa"), ("original", "eager")])
def test_packed_loss_equals_unpacked_loss(weighting, impl):
    """Same examples, same noise levels and masks: packing changes the layout, not the loss."""
    from dreamtune.tiny import tiny_lm

    lm = tiny_lm(layers=2)
    lm.model.config._attn_implementation = impl
    g = torch.Generator().manual_seed(0)
    exs = [([7 + i, 8, 9, 10][: 2 + i % 3], [11 + j for j in range(3 + i)] + [EOS]) for i in range(5)]
    t_doc = torch.rand(len(exs), generator=g) * 0.8 + 0.1
    packed = pack(exs, max_length=20, pad_id=EOS)
    # draw masks per document, then place them in the packed layout
    doc_masks = [torch.rand(len(p) + len(r), generator=g) < t_doc[i] for i, (p, r) in enumerate(exs)]
    doc_masks = [m & torch.tensor([False] * len(p) + [True] * len(r)) for m, (p, r) in zip(doc_masks, exs)]
    pm = torch.zeros_like(packed.maskable)
    for i, m in enumerate(doc_masks):
        row, cols = (packed.doc_ids == i).nonzero(as_tuple=True)
        pm[row, cols] = m
    with torch.no_grad():
        noisy = torch.where(pm, torch.full_like(packed.input_ids, lm.mask_token_id), packed.input_ids)
        t_pos = t_doc[packed.doc_ids.clamp(min=0)]
        logits = lm.logits(noisy, position_ids=packed.position_ids, positions=pm, doc_ids=packed.doc_ids)
        w = position_weights(t_pos, pm, weighting, 0.3, doc_ids=packed.doc_ids)
        packed_loss, _ = diffusion_loss(logits, packed.input_ids[pm], w)
        # unpacked: each document alone, exactly its own length
        all_logits, all_t, all_w = [], [], []
        for i, (p, r) in enumerate(exs):
            ids = torch.tensor([p + r])
            m = doc_masks[i][None]
            nz = torch.where(m, torch.full_like(ids, lm.mask_token_id), ids)
            all_logits.append(lm.logits(nz, positions=m))
            all_t.append(ids[m])
            all_w.append(position_weights(t_doc[i:i + 1], m, weighting, 0.3))
        unpacked_loss, _ = diffusion_loss(torch.cat(all_logits), torch.cat(all_t), torch.cat(all_w))
    assert pm.sum() > 5
    assert torch.allclose(packed_loss, unpacked_loss, atol=1e-5), (packed_loss, unpacked_loss)
