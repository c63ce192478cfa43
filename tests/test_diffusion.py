"""The objective against direct computations: masking, rates, weights (CART by hand), normalisation, shift."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamtune.diffusion import (cart_kernel, cart_weights, diffusion_loss, mask_tokens, position_weights,
                                 sample_t, time_weights)


def test_sample_t_range_and_floor():
    g = torch.Generator().manual_seed(0)
    t = sample_t(10_000, g)
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.02
    t = sample_t(10_000, torch.Generator().manual_seed(0), eps=1e-3)
    assert t.min() >= 1e-3


def test_only_maskable_positions_are_masked():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(40).view(2, 20)
    maskable = torch.zeros(2, 20, dtype=torch.bool)
    maskable[:, 8:] = True  # prompt of 8 tokens
    noisy, masked = mask_tokens(ids, maskable, torch.tensor([1.0, 1.0]), mask_token_id=999, generator=g)
    assert masked.equal(maskable)  # t = 1 masks every maskable token, nothing else
    assert (noisy[masked] == 999).all() and noisy[~masked].equal(ids[~masked])


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_is_t(t):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(64, 512, dtype=torch.long)
    _, masked = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), torch.full((64,), t), 5, g)
    rate = masked.float().mean().item()
    assert abs(rate - t) < 4 * math.sqrt(t * (1 - t) / masked.numel())


def test_per_position_t_for_packed_rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 2000, dtype=torch.long)
    t = torch.cat([torch.zeros(1000), torch.ones(1000)])[None]  # two documents: t = 0 and t = 1
    _, masked = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), t, 5, g)
    assert not masked[0, :1000].any() and masked[0, 1000:].all()


def test_time_weights():
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(time_weights(t, "original"), torch.tensor([4.0, 2.0]))
    assert torch.allclose(time_weights(t, "linear"), torch.tensor([0.75, 0.5]))
    assert torch.allclose(time_weights(t, "none"), torch.ones(2))


def test_cart_against_hand_computation():
    """Row of 6, p = 0.5, masked at 2, 3, 5: weight_i = sum_{j != i, j unmasked} 0.5 p (1-p)^(|i-j|-1)."""
    p = 0.5
    masked = torch.tensor([[False, False, True, True, False, True]])
    w = cart_weights(masked, p)
    k = lambda d: 0.5 * p * (1 - p) ** (d - 1)  # noqa: E731
    # unmasked: 0, 1, 4
    expect2 = k(2) + k(1) + k(2)  # j=0 (d=2), j=1 (d=1), j=4 (d=2)
    expect3 = k(3) + k(2) + k(1)
    expect5 = k(5) + k(4) + k(1)
    assert w[0, 2].item() == pytest.approx(expect2, abs=1e-7)
    assert w[0, 3].item() == pytest.approx(expect3, abs=1e-7)
    assert w[0, 5].item() == pytest.approx(expect5, abs=1e-7)


def test_cart_matches_brute_force_and_lies_in_0_1():
    g = torch.Generator().manual_seed(3)
    masked = torch.rand(3, 300, generator=g) < 0.6
    p = 0.1
    w = cart_weights(masked, p)
    i = torch.arange(300)
    d = (i[:, None] - i[None, :]).abs().double()
    K = torch.where(d > 0, 0.5 * p * (1 - p) ** (d - 1), torch.zeros_like(d))
    brute = ((~masked).double() @ K.T).float()
    assert torch.allclose(w, brute, atol=1e-6)
    assert w.min() >= 0 and w.max() <= 1


def test_cart_kernel_truncation_is_negligible():
    k = cart_kernel(0.1, 10_000)
    assert k.numel() < 1000 and float(k[0]) < 1e-11


def test_cart_per_document():
    masked = torch.tensor([[False, True, True, False, True, False]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    w = cart_weights(masked, 0.3, docs)
    assert torch.allclose(w[0, :3], cart_weights(masked[:, :3], 0.3)[0])
    assert torch.allclose(w[0, 3:], cart_weights(masked[:, 3:], 0.3)[0])


def test_position_weights_order_matches_boolean_indexing():
    t = torch.tensor([0.5, 0.25])
    masked = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.allclose(position_weights(t, masked, "original"), torch.tensor([2.0, 2.0, 4.0, 4.0]))


def test_loss_normalised_by_masked_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g)
    targets = torch.randint(11, (7,), generator=g)
    w = torch.rand(7, generator=g)
    loss, ce = diffusion_loss(logits, targets, w)
    direct = (F.cross_entropy(logits, targets, reduction="none") * w).sum() / 7
    assert torch.allclose(loss, direct) and torch.allclose(ce, F.cross_entropy(logits, targets))


def test_focal_term():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, generator=g)
    targets = torch.randint(9, (5,), generator=g)
    loss, _ = diffusion_loss(logits, targets, torch.ones(5), focal=True, alpha=0.25, gamma=2.0)
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(loss, (0.25 * (1 - torch.exp(-ce)) ** 2 * ce).sum() / 5)


def test_empty_mask_gives_zero_loss_with_a_graph():
    logits = torch.randn(0, 9, requires_grad=True)
    loss, _ = diffusion_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0


def test_training_loss_uses_the_shift():
    """The end-to-end training loss of a shifted model equals CE of the raw logits one position earlier."""
    from omegaconf import OmegaConf

    from dreamtune.batching import collate
    from dreamtune.config import TrainConfig
    from dreamtune.tiny import tiny_lm
    from dreamtune.diffusion import forward_loss

    lm = tiny_lm()
    cfg = OmegaConf.structured(TrainConfig)
    cfg.diffusion.time_reweighting = "none"
    batch = collate([([7, 8, 9], [10, 11, 0]), ([7, 9], [12, 0])], max_length=8, pad_id=0)
    with torch.no_grad():
        loss, _, n = forward_loss(lm, batch, cfg.diffusion, torch.Generator().manual_seed(5))
        # redo the draws by hand
        g = torch.Generator().manual_seed(5)
        t = sample_t(2, g)
        noisy, masked = mask_tokens(batch.input_ids, batch.maskable, t, lm.mask_token_id, g)
        raw = lm.model(input_ids=noisy).logits  # [B, L, V], unshifted
        shifted = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        direct = F.cross_entropy(shifted[masked], batch.input_ids[masked])
    assert n == int(masked.sum()) > 0
    assert torch.allclose(loss, direct, atol=1e-5)


@pytest.mark.parametrize("focal", [False, True])
def test_fused_head_loss_matches_logits_path(focal):
    """The chunked linear+CE gives the loss and the gradients of head(h) + diffusion_loss."""
    from dreamtune.diffusion import head_loss

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    from dreamtune.fused_ce import weighted_linear_ce  # the trained-head gradient too, called directly
    fl, _ = weighted_linear_ce(h, head.weight, torch.zeros(50, dtype=torch.long), torch.ones(50))
    fl.backward()
    assert head.weight.grad is not None
    h.grad = None
    head.weight.grad = None
    targets = torch.randint(300, (50,), generator=g)
    w = torch.rand(50, generator=g) * 3
    # chunks of 16 rows (the last one short): per-chunk log-sum-exp and in-place softmax
    loss, ce = weighted_linear_ce(h, head.weight, targets, w, focal=(0.25, 2.0) if focal else None, chunk=16)
    loss.backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad = None
    head.weight.grad = None
    ref, ref_ce = diffusion_loss(head(h), targets, w, focal=focal)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(ce.mean(), ref_ce, rtol=1e-5)
    assert torch.allclose(ce, F.cross_entropy(head(h), targets, reduction="none"), atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, head.weight.grad, atol=1e-6)
    head.weight.requires_grad_(False)  # frozen (LoRA): head_loss takes the fused path, same value
    fused, _ = head_loss(head, h.detach(), targets, w, focal=focal)
    assert torch.allclose(fused, ref.detach(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_ce_matches_cross_entropy_by_chunks(dtype):
    """The chunked CE keeps the logits' dtype and a log-sum-exp for the backward: same values and gradients
    as F.cross_entropy on a float32 copy, and the logits are left as they were (in-place maths on copies)."""
    from dreamtune.diffusion import masked_ce

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 50, generator=g) * 3).to(dtype).requires_grad_()
    t, w = torch.randint(50, (37,), generator=g), torch.rand(37, generator=g)
    before = x.detach().clone()
    ce = masked_ce(x, t, chunk=8)  # five chunks, the last one short
    (ce * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    ref = F.cross_entropy(x.float(), t, reduction="none")
    (ref * w).sum().backward()
    assert torch.equal(x.detach(), before) and ours.dtype == dtype
    torch.testing.assert_close(ce, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.float(), x.grad.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
