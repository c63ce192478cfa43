"""The `grpo.*` section of the training configuration (used when `trainer.stage=grpo`), its checks, and the
names of what a GRPO step logs.

    dreamtune train configs/dream7b_gsm8k_grpo.yaml grpo.num_generations=8 grpo.beta=0.0

Kept apart from dreamtune/config.py so that the reinforcement-learning keys read as one block; config.py
adds the section and calls `check_grpo` for a GRPO recipe. Nothing here imports the rest of dreamtune.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_FORMATS = ("chat", "fewshot", "sft")
SAMPLER_ALGS = ("fast", "origin", "maskgit_plus", "topk_margin", "entropy")
# The keys of each GRPO step's row in RUN/metrics.jsonl besides "step" and "time_s" (docs/artifacts.md), in the
# order dreamtune/grpo.py writes them; "kl" only with beta > 0. Here, not in grpo.py, so that `dreamtune report`
# reads the names without importing torch.
METRICS = ("loss", "reward_mean", "reward_std", "accuracy", "clip_fraction", "completion_length", "lr", "grad_norm",
           "rollout_s", "update_s", "tokens_per_s", "kl")


@dataclass
class GRPOConfig:
    # Prompts and the grader. task: a benchmark (gsm8k, math500, aime24, aime25, amc23, gpqa) or a synthetic
    # task (arithmetic, sudoku); it picks the grader that scores each completion.
    task: str = "gsm8k"
    prompts_file: str = "data/gsm8k/train.jsonl"  # benchmark rows {question, answer}; synthetic rows {prompt, answer}
    # chat: the benchmark's chat prompt (system turn, boxed-answer instruction); fewshot: base-model few-shot text;
    # sft: the row's prompt through the chat template exactly as `dreamtune train` renders SFT prompts
    prompt_format: str = "chat"
    max_prompt_length: int = 512  # longer prompts are dropped (with a count in the log)
    # The algorithm (d1's diffu-GRPO): G rollouts per prompt, group-normalised advantages, num_iterations
    # clipped updates per batch of rollouts, each with its own random prompt mask.
    num_generations: int = 8
    num_iterations: int = 4
    p_mask_prompt: float = 0.15
    # True: the G rollouts of a prompt share each iteration's prompt mask (common random numbers: every row's
    # estimate as d1's, but a token all G rollouts share then gets advantages summing to 0 and no gradient;
    # with one mask per row, d1's, such tokens add mask noise). False: one mask per rollout, d1's.
    prompt_mask_per_group: bool = False
    epsilon: float = 0.2
    beta: float = 0.04  # weight of the KL term to the frozen reference (0: no reference model is kept)
    format_reward: float = 0.0  # added to the reward when the completion states an answer the grader can read
    # The rollout sampler (dreamtune.sampling.generate).
    alg: str = "fast"
    max_new_tokens: int = 256
    steps: int = 128  # Dream's samplers (not fast): diffusion steps
    block_length: int = 32  # fast: block length
    threshold: float = 0.9  # fast: reveal positions above this confidence
    temperature: float = 0.9


def check_grpo(cfg) -> None:
    """ValueError (one line naming the key) for GRPO settings that type checks cannot catch."""
    g = cfg.grpo
    positive = {"num_generations": g.num_generations, "num_iterations": g.num_iterations,
                "max_new_tokens": g.max_new_tokens, "block_length": g.block_length, "max_prompt_length": g.max_prompt_length}
    for key, v in positive.items():
        if v <= 0:
            raise ValueError(f"bad value for 'grpo.{key}': {v} (must be > 0)")
    if g.num_generations < 2:
        raise ValueError(f"bad value for 'grpo.num_generations': {g.num_generations} (GRPO compares completions of one "
                         f"prompt with each other: at least 2)")
    if cfg.trainer.stage == "grpo" and cfg.data.micro_batch_tokens:
        raise ValueError("data.micro_batch_tokens groups SFT rows by length; GRPO's micro-batches are "
                         "data.micro_batch_size_per_gpu prompts (each with grpo.num_generations rollouts): unset it")
    if g.alg != "fast" and g.steps <= 0:
        raise ValueError(f"bad value for 'grpo.steps': {g.steps} (must be > 0 for grpo.alg={g.alg})")
    ranges = {"p_mask_prompt": (g.p_mask_prompt, 0.0, 1.0), "epsilon": (g.epsilon, 0.0, 1.0),
              "beta": (g.beta, 0.0, 10.0), "format_reward": (g.format_reward, 0.0, 10.0),
              "threshold": (g.threshold, 1e-9, 1.0), "temperature": (g.temperature, 0.0, 10.0)}
    for key, (v, lo, hi) in ranges.items():
        if not lo <= v <= hi:
            raise ValueError(f"bad value for 'grpo.{key}': {v} (must lie in [{lo}, {hi}])")
    if g.temperature == 0:
        raise ValueError("grpo.temperature=0 samples the same completion G times (no advantage, nothing learned); "
                         "use e.g. grpo.temperature=0.9")
