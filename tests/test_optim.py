"""dreamtune.optim.AdamW: torch's AdamW arithmetic with the moments stored in bf16 (optim.state_dtype).
Training with it (resume, bad settings) is tested in test_train.py."""

import pytest
import torch

from dreamtune.optim import AdamW


def params_and_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]  # 6 steps
    return params, grads


def run(opt_cls, steps_grads, params, **kw):
    opt = opt_cls(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # lr changes every step
    for grads in steps_grads:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        sched.step()
    return opt


@pytest.fixture(params=["foreach", "per-tensor"])
def path(request, monkeypatch):
    """Both update paths: small tensors batched by torch._foreach ops, large ones one call each."""
    import dreamtune.optim as O

    if request.param == "per-tensor":
        monkeypatch.setattr(O, "FOREACH_MAX", 0)
    return request.param


def test_float32_state_is_torch_adamw(path):
    ours, grads = params_and_grads()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    run(AdamW, grads, ours, state_dtype=torch.float32)
    run(torch.optim.AdamW, grads, ref, foreach=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_chunked_update_equals_whole(monkeypatch):
    import dreamtune.optim as O

    whole, grads = params_and_grads(2)
    chunked = [torch.nn.Parameter(p.detach().clone()) for p in whole]
    monkeypatch.setattr(O, "FOREACH_MAX", 0)
    run(AdamW, grads, whole, state_dtype=torch.bfloat16)
    monkeypatch.setattr(O, "CHUNK", 4)  # every parameter of 5+ elements is updated in slices of 4
    run(AdamW, grads, chunked, state_dtype=torch.bfloat16)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_foreach_batches_equal_per_tensor_updates(monkeypatch):
    """The batched path does the per-tensor arithmetic exactly, with bf16 moments, across batch limits."""
    import dreamtune.optim as O

    a, grads = params_and_grads(4)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = run(AdamW, grads, a, state_dtype=torch.bfloat16)
    monkeypatch.setattr(O, "CHUNK", 40)  # a batch is flushed once it holds 40+ elements: several batches
    run(AdamW, grads, c, state_dtype=torch.bfloat16)
    monkeypatch.setattr(O, "FOREACH_MAX", 0)
    opt_b = run(AdamW, grads, b, state_dtype=torch.bfloat16)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
        assert torch.equal(opt_a.state[x]["exp_avg_sq"], opt_b.state[y]["exp_avg_sq"])


def test_bfloat16_state_is_stored_in_bf16_and_stays_close(path):
    ours, grads = params_and_grads(1)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = run(AdamW, grads, ours, state_dtype=torch.bfloat16)
    run(torch.optim.AdamW, grads, ref, foreach=False)
    for p in ours:
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        assert p.dtype == torch.float32
    for a, b, s in zip(ours, ref, start):  # the updates agree to bf16 precision of the moments
        torch.testing.assert_close(a - s, b - s, atol=1e-4, rtol=2e-2)


def test_bf16_moments_refuse_a_beta_too_close_to_one():
    """0.999 * x rounds back to x in bf16: such a moment would never decay."""
    x = torch.tensor(1.0, dtype=torch.bfloat16)
    assert (x.float() * 0.999).to(torch.bfloat16) == x
    with pytest.raises(ValueError, match="cannot decay"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 0.999))


def test_folded_clipping_equals_clip_grad_norm_then_step(path):
    """step(grad_scale=clip_coefficient(norm, c)) gives what clip_grad_norm_(c) and then step() give."""
    from dreamtune.optim import clip_coefficient

    ours, grads = params_and_grads(3)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_a = AdamW(ours, lr=1e-2, state_dtype=torch.float32)
    opt_b = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, foreach=False)
    clipped = 0
    for step_grads in grads:
        for a, b, gr in zip(ours, ref, step_grads):
            a.grad, b.grad = gr.clone() * 3, gr.clone() * 3  # norms ~ 10: clipped to 1
        norm = torch.nn.utils.get_total_norm([p.grad for p in ours])
        clipped += bool(clip_coefficient(norm, 1.0) < 1)
        opt_a.step(grad_scale=clip_coefficient(norm, 1.0))
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_b.step()
    assert clipped == len(grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_param_groups_keep_their_own_lr_in_batches():
    """Small tensors are batched per parameter group: a group's lr never leaks into another's batch."""
    import dreamtune.optim as O

    def two_groups():
        g = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(4)]

    results = []
    for foreach_max in (O.FOREACH_MAX, 0):
        ps = two_groups()
        opt = AdamW([{"params": ps[:2], "lr": 1e-1}, {"params": ps[2:], "lr": 1e-4}], state_dtype=torch.bfloat16)
        start = [p.detach().clone() for p in ps]
        O.FOREACH_MAX, saved = foreach_max, O.FOREACH_MAX
        try:
            for _ in range(3):
                for p in ps:
                    p.grad = torch.ones_like(p)
                opt.step(grad_scale=0.5)  # a Python float is accepted too
        finally:
            O.FOREACH_MAX = saved
        results.append([p.detach() - s for p, s in zip(ps, start)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][2].abs().max() < 1e-3 < results[0][0].abs().max()  # lr 1e-4 moves ~3e-4, lr 0.1 ~0.3
