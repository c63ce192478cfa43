"""`--compile` (torch.compile of each decoder layer) computes the same function as the eager model."""

import torch

from dreamtune.distributed import apply_compile
from dreamtune.tiny import tiny_lm


def test_compiled_layers_match_eager():
    lm = tiny_lm(layers=2)
    x = torch.randint(6, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = lm.logits(x)
        apply_compile(lm.model)
        compiled = lm.logits(x)
    assert torch.allclose(eager, compiled, atol=1e-4)
