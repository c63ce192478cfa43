#!/usr/bin/env python3
"""How much of a diffu-GRPO gradient is prompt-mask noise: one batch of rollouts from a model, the policy
gradient at ratio 1 (the first inner iteration) with the prompt unmasked (p_mask_prompt 0: deterministic),
with d1's one prompt mask per rollout, and with one mask per prompt shared by its rollouts
(grpo.prompt_mask_per_group), several mask draws each; norms and cosines between them.

    PYTHONPATH=. python3 bench/grpo_grad_noise.py MODEL_DIR PROMPTS.parquet --task arithmetic --new-tokens 30
    PYTHONPATH=. python3 bench/grpo_grad_noise.py MODEL_DIR PROMPTS.parquet --task sudoku --new-tokens 58

MODEL_DIR: an SFT model of bench/grpo_learn.py (`--save-start DIR` keeps its start and train.parquet);
--new-tokens: the canvas grpo_learn gives that task (its log's grpo.max_new_tokens, or data.new_tokens in
its JSON). Why it matters: the one-forward estimate at a completion position depends only on the (masked)
prompt, so a token that all G rollouts of a prompt share gets advantages summing to 0: exactly no gradient
when the rollouts see one mask, a difference of log-probabilities under different masks when each has its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("prompts_file")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "sudoku"])
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--p-mask-prompt", type=float, default=0.15)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from dreamtune import grpo
    from dreamtune.config import load_config
    from dreamtune.engine import load_for_generation
    from dreamtune.grpo_prompts import load_prompts

    cfg = load_config(None, [f"model.partial_pretrain={a.model}", "trainer.stage=grpo", f"grpo.task={a.task}",
                             f"grpo.prompts_file={a.prompts_file}", "grpo.prompt_format=sft",
                             f"grpo.num_generations={a.generations}", f"grpo.max_new_tokens={a.new_tokens}",
                             "grpo.block_length=32", f"grpo.temperature={a.temperature}", "grpo.threshold=0.9",
                             "trainer.device=cpu"])
    lm = load_for_generation(a.model, "cpu", "fp32")
    lm.model.eval()
    b = grpo.rollout(lm, load_prompts(cfg, lm)[:a.prompts], cfg, torch.Generator().manual_seed(0), cuda_graphs=False)
    params = list(lm.model.parameters())

    def grad(p_mask: float, seed: int, group: int) -> torch.Tensor:
        lm.model.zero_grad()
        logp = grpo.completion_logprobs(lm, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], p_mask,
                                        torch.Generator().manual_seed(seed), group)
        loss, _, _ = grpo.grpo_loss(logp, logp.detach(), None, b["advantages"], b["completion_mask"], 0.2, 0.0)
        loss.backward()
        return torch.cat([x.grad.flatten() for x in params])

    def cos(x, y) -> float:
        return float(x @ y / (x.norm() * y.norm()))

    clean = grad(0.0, 0, 1)
    out = {"model": a.model, "task": a.task, "rollouts": int(b["rewards"].numel()), "reward_mean": float(b["rewards"].mean()),
           "groups_with_signal": int((b["advantages"].view(-1, a.generations).abs().sum(1) > 0).sum()),
           "completion_length": float(b["completion_mask"].sum(1).mean()), "clean_norm": float(clean.norm())}
    print(f"{out['rollouts']} rollouts, reward {out['reward_mean']:.3f}, {out['groups_with_signal']} of {a.prompts} groups "
          f"with a signal, {out['completion_length']:.1f} completion tokens; p_mask_prompt 0: |g| = {clean.norm():.3f}")
    for name, group in [("one mask per rollout (d1)", 1), ("one mask per prompt", a.generations)]:
        gs = [grad(a.p_mask_prompt, s, group) for s in range(a.draws)]
        rows = [{"norm": float(g.norm()), "cos_clean": cos(g, clean), "cos_next_draw": cos(g, gs[(k + 1) % len(gs)])}
                for k, g in enumerate(gs)]
        out[name] = rows
        print(f"p_mask_prompt {a.p_mask_prompt}, {name}: |g| " + " ".join(f"{r['norm']:.3f}" for r in rows)
              + "; cos to p=0 " + " ".join(f"{r['cos_clean']:+.2f}" for r in rows)
              + "; cos between draws " + " ".join(f"{r['cos_next_draw']:+.2f}" for r in rows))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
