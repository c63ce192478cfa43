"""The generation engine: one way from a model and prompts to answers, used by every verb.

    from dreamtune.engine import DreamSampler, generate, generate_batches, load_for_generation
    lm = load_for_generation("checkpoints/exp1/checkpoint-final")
    out = generate(lm, input_ids, attention_mask, DreamSampler(alg="entropy", steps=256), max_new_tokens=256,
                   generator=torch.Generator().manual_seed(0))
    out = generate(lm, input_ids, max_new_tokens=256, alg="fast", threshold=0.9)   # settings by name

A sampler is a frozen dataclass of its own settings, with one function that runs it; `SAMPLERS` is the
registry (a plain dict). A new sampler is one new module (its dataclass and its function) and one entry
here. `--alg` names map to samplers through `ALGS`.

- `generate`: one batch of left-padded prompts, through the sampler.
- `render_prompt` / `encode_prompt`: the text and ids a model sees for a prompt, rendered as training
  renders it (dreamtune.data's chat rendering, with the generation prompt).
- `decode_answer`: the answer text up to the model's first stop token.
- `generate_batches`: many prompts, batched by length, seeded per batch, in input order.
- `record` / `describe`: the settings that applied, for result files and for the console.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections.abc import Callable

import torch

from dreamtune.fast_sampling import FastSampler, generate_fast
from dreamtune.llada_sampling import LLADA_ALGS, LLaDASampler, generate_llada
from dreamtune.sampling import DREAM_ALGS, DreamSampler, generate_dream
from dreamtune.sampling_core import GenerateOutput, check_prompts

# sampler name -> (settings dataclass, the function that runs it)
SAMPLERS = {
    "dream": (DreamSampler, generate_dream),
    "fast": (FastSampler, generate_fast),
    "llada": (LLaDASampler, generate_llada),
}
# --alg -> sampler name
ALGS = {**{a: "dream" for a in DREAM_ALGS}, "fast": "fast", **{a: "llada" for a in LLADA_ALGS}}
Sampler = DreamSampler | FastSampler | LLaDASampler


def sampler_name(sampler) -> str:
    return next(name for name, (cls, _) in SAMPLERS.items() if isinstance(sampler, cls))


def sampler_for(alg: str = "origin", **settings):
    """The sampler that `alg` names, with `settings` (names of its dataclass's fields); a setting that sampler
    does not have is a ValueError listing the ones it has."""
    if alg not in ALGS:
        raise ValueError(f"unknown alg '{alg}'; use one of {', '.join(ALGS)}")
    cls, _ = SAMPLERS[ALGS[alg]]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of the "
                         f"{ALGS[alg]} sampler (alg {alg}); its settings: {', '.join(n for n in names if n != 'alg')}")
    return cls(**({"alg": alg} if "alg" in names else {}), **settings)


def settings_of(alg: str) -> set[str]:
    """The setting names of the sampler `alg` names."""
    if alg not in ALGS:
        raise ValueError(f"unknown alg '{alg}'; use one of {', '.join(ALGS)}")
    return {f.name for f in dataclasses.fields(SAMPLERS[ALGS[alg]][0])} - {"alg"}


def sampler_with(alg: str, **settings):
    """The sampler `alg` names, taking those of `settings` it has: for a form or a recipe that offers one set
    of fields for every sampler (the demo, GRPO's rollouts)."""
    have = settings_of(alg)
    return sampler_for(alg, **{k: v for k, v in settings.items() if k in have})


@torch.no_grad()
def generate(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, sampler: Sampler | None = None, *,
             max_new_tokens: int, generator: torch.Generator | None = None, return_history: bool = False,
             on_step: Callable[[torch.Tensor], None] | None = None, **settings) -> GenerateOutput:
    """max_new_tokens after each left-padded prompt. input_ids [B, P] long, attention_mask [B, P] (1 = real
    token, 0 = left pad) on the model's device. `sampler`, or its settings by name (`alg=...` and the
    sampler's fields). on_step(x) gets the canvas [B, P + max_new_tokens] after every step that ran the model
    (the demo streams it; it must not modify x)."""
    if sampler is None:
        sampler = sampler_for(**settings)
    elif settings:
        raise ValueError(f"pass the sampler or its settings ({', '.join(settings)}), not both")
    check_prompts(lm, input_ids, attention_mask, max_new_tokens)
    _, run = SAMPLERS[sampler_name(sampler)]
    return run(lm, input_ids, attention_mask, sampler, max_new_tokens=int(max_new_tokens), generator=generator,
               return_history=return_history, on_step=on_step)


def record(sampler, max_new_tokens: int) -> dict:
    """The settings that decided the answers, as result files record them: the sampler's name, alg, canvas
    length and its fields (less those that change only how much is computed)."""
    skip = getattr(sampler, "NOT_RECORDED", ())
    fields = {f.name: getattr(sampler, f.name) for f in dataclasses.fields(sampler) if f.name not in skip}
    name = sampler_name(sampler)
    return {"sampler": name, "alg": fields.pop("alg", name), "max_new_tokens": int(max_new_tokens), **fields}


def describe(sampler, max_new_tokens: int) -> str:
    """The settings in one line, printed with every result."""
    r = record(sampler, max_new_tokens)
    return ", ".join(f"{k} {'off' if v is None else v}" for k, v in r.items() if k != "sampler")


# ------------------------------------------------------------------------------------- model and prompts


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def load_for_generation(path: str, device: str = "auto", dtype: str = "auto", compile: bool = False):
    """A DiffusionLM ready to generate: on the device, in eval mode, with a tokenizer."""
    from dreamtune.models import load

    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    lm = load(path, dtype=dtype, device=dev)
    if lm.tokenizer is None:
        raise ValueError(f"'{path}' has no tokenizer files; generation needs them (copy the base model's tokenizer beside the weights)")
    if compile:
        from dreamtune.distributed import apply_compile

        apply_compile(lm.model)
    return lm


def render_prompt(tokenizer, prompt, chat: bool = False, system: str | None = None) -> str:
    """The text the model sees for one prompt: a list of messages goes through the chat template with the
    generation prompt, exactly as training renders prompts (dreamtune.data.render_prompts); a string too
    with chat=True (one user turn, after an optional system turn), else as is."""
    from dreamtune.data import render_prompts

    if isinstance(prompt, str) and not chat:
        return prompt
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError("a prompt must be a string or a list of {\"role\", \"content\"} messages")
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}] + prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template, so chat messages cannot be rendered; pass plain text prompts without --chat")
    return render_prompts(tokenizer, [prompt])[0]


def encode_prompt(tokenizer, prompt, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of render_prompt(...). Chat-rendered text already holds its special tokens."""
    text = render_prompt(tokenizer, prompt, chat, system)
    templated = isinstance(prompt, list) or chat
    ids = tokenizer.encode(text, add_special_tokens=not templated)
    if not ids:
        raise ValueError("empty prompt: give at least one token of text")
    return ids


def left_pad(prompts: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as left-padded ids [B, P] and their 0/1 mask [B, P]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def decode_answer(lm, tokens: list[int], skip_special_tokens: bool = False) -> tuple[str, int]:
    """(text up to the first of the model's stop tokens (DiffusionLM.stop_ids), its token count)."""
    stops = set(lm.stop_ids)
    n = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return lm.tokenizer.decode(tokens[:n], skip_special_tokens=skip_special_tokens), n


def batch_seed(seed: int, keys: list[str]) -> int:
    """A batch's generator seed from the run's seed and the batch's row keys: the same rows in the same
    batch draw the same numbers in any run (and on resume), whatever ran before them."""
    return (seed * 1_000_003 + zlib.crc32("\x1f".join(keys).encode())) % (2**63)


def generate_batches(lm, prompts: list[list[int]], sampler, *, max_new_tokens: int, batch_size: int, seed: int,
                     keys: list[str] | None = None, on_batch=None, skip_special_tokens: bool = False) -> list[dict]:
    """Generate for many prompts, batch_size at a time, left-padded. Prompts are grouped by length (less
    padding); results come back in input order as {"tokens", "response", "answer_tokens", "nfe", "time_s"}
    (nfe and time_s are the batch's). on_batch(indices, results) is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    results: list[dict | None] = [None] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, lm.device)
        gen = torch.Generator(device=lm.device).manual_seed(batch_seed(seed, [keys[i] for i in idx]))
        t0 = time.perf_counter()
        out = generate(lm, ids, mask, sampler, max_new_tokens=max_new_tokens, generator=gen)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        dt = time.perf_counter() - t0
        new = out.sequences[:, ids.shape[1]:].tolist()
        done = []
        for row, i in enumerate(idx):
            text, n = decode_answer(lm, new[row], skip_special_tokens)
            results[i] = {"tokens": new[row], "response": text, "answer_tokens": n, "nfe": out.nfe, "time_s": dt}
            done.append(results[i])
        if on_batch is not None:
            on_batch(idx, done)
    return results  # type: ignore[return-value]
