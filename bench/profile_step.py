"""Where a 7B training step's time goes: torch.profiler over dreamtune's full fine-tune step (the
`full` variant of bench/train_step.py: AC every layer, masked-only logits, fused AdamW) at 2 x 2048.

    python bench/profile_step.py        # one GPU; prints the top CUDA kernels and writes $OUT/profile.txt
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import DREAM7B, MASK_ID, TrainConfig, build, collate, forward_loss, make_rows  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from dreamtune import distributed as D  # noqa: E402
from dreamtune.models import DiffusionLM  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    model = build(DREAM7B, dev)
    D.apply_activation_checkpointing(model, 1)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    lm = DiffusionLM(model=model, tokenizer=None, mask_token_id=MASK_ID, shift=True)
    cfg = OmegaConf.structured(TrainConfig)
    batch = collate(make_rows(2, 2048, DREAM7B["vocab_size"], torch.Generator().manual_seed(1)), max_length=2048, pad_id=0).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = forward_loss(lm, batch, cfg, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(table)


if __name__ == "__main__":
    main()
