"""`dreamtune generate`: text from a prompt, or from a JSONL file of prompts; and the pieces that
`dreamtune eval` and `dreamtune compare` share (sampler options, model loading, batched generation).

    dreamtune generate --model DIR "What is 7*8?" --chat --max-new-tokens 128 --alg entropy --seed 0
    dreamtune generate --model DIR "..." --alg fast --threshold 0.9 --block-length 32 --json
    dreamtune generate --model LLaDA-8B-Instruct "..." --chat --alg low_confidence --block-length 32 --steps 128 --temperature 0
    dreamtune generate --model DIR --input prompts.jsonl --output out.jsonl --batch-size 16

The answer (text up to the first eos) goes to stdout, the timing line to stderr. In batch mode each input
row has `prompt` (a string, or a list of {role, content} messages) or `messages`; the output repeats each
row with `response`, `answer_tokens` and `nfe` added, and is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

from dreamtune.atomic import check_writable, write_jsonl
from dreamtune.cli import parser, positive_int  # noqa: F401  (parser: verbs import it from here too)
from dreamtune.sampling import ALGS, LLADA_ALGS, generate

DEVICES = ("auto", "cpu", "cuda")
# Dream's diffusion_generate, called without top_k, takes the model config's legacy generation default 50:
# confidences come from the renormalised top 50. The verbs default to it, so that a command with the same
# arguments as a Dream script samples as that script does.
DREAM_TOP_K = 50
DTYPES = ("auto", "bf16", "fp16", "fp32")


# ------------------------------------------------------------------------------------- shared options


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA if visible (LOCAL_RANK's GPU under torchrun)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers for Dream's samplers (GPU; pays off over many steps); "
                         "the fast sampler runs CUDA graphs by itself")


def add_sampler_args(ap: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = ap.add_argument_group("sampler (recorded with every result)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="answer canvas length (default %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="diffusion steps of Dream's and LLaDA's samplers (default: = max-new-tokens; "
                                                           "LLaDA's splits them evenly over the blocks)")
    g.add_argument("--alg", default="entropy", choices=ALGS, help="Dream's algorithms, fast (Fast-dLLM style), or LLaDA's "
                                                                 "low_confidence / random; default %(default)s")
    g.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default %(default)s, Dream's README)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus filter, 1 = off (default %(default)s)")
    g.add_argument("--top-k", type=int, default=DREAM_TOP_K,
                   help="top-k filter; 0 = off (default %(default)s: what Dream's diffusion_generate uses when top_k "
                        "is not passed; Dream's own benchmark script passes none, i.e. --top-k 0)")
    g.add_argument("--alg-temp", type=float, default=0.0, help="> 0: draw positions from softmax(confidence / alg-temp)")
    g.add_argument("--eps", type=float, default=1e-3, help="end of Dream's time grid (default %(default)s)")
    g.add_argument("--threshold", type=float, default=0.9, help="fast: reveal positions above this confidence (1 = one per step)")
    g.add_argument("--block-length", type=int, default=32, help="fast, low_confidence, random: block length (default %(default)s)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="low_confidence, random: classifier-free guidance scale, 0 = off "
                                                                "(a second forward with the prompt masked)")
    g.add_argument("--tokens-per-step", type=int, default=None, help="fast: reveal exactly this many per step instead of the threshold")
    g.add_argument("--no-cache", action="store_true", help="fast: no KV cache (every step runs the whole canvas)")
    g.add_argument("--dual-cache", action="store_true", help="fast: also cache the masked suffix")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (default %(default)s)")


def decoding_settings(args) -> dict:
    """Every decoding setting, as recorded in eval_results.json / compare JSON, and passed to generate()."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or a positive number of tokens, got {args.top_k}")
    steps = args.max_new_tokens if args.steps is None else args.steps
    if args.alg in LLADA_ALGS:  # LLaDA's sampler: no top-p/top-k filter, and guidance (recorded only here)
        return {"sampler": "llada", "alg": args.alg, "steps": steps, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": None, "top_k": None, "alg_temp": 0.0, "eps": args.eps,
                "threshold": args.threshold, "block_length": args.block_length, "tokens_per_step": None,
                "use_cache": not args.no_cache, "dual_cache": args.dual_cache, "cfg_scale": args.cfg_scale}
    if args.cfg_scale:
        raise ValueError(f"--cfg-scale is a setting of LLaDA's sampler; use --alg low_confidence or random, not {args.alg}")
    return {
        "sampler": "fast" if args.alg == "fast" else "dream",
        "alg": args.alg,
        "steps": None if args.alg == "fast" else steps,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k or None,
        "alg_temp": args.alg_temp,
        "eps": args.eps,
        "threshold": args.threshold,
        "block_length": args.block_length,
        "tokens_per_step": args.tokens_per_step,
        "use_cache": not args.no_cache,
        "dual_cache": args.dual_cache,
    }


def describe(decoding: dict) -> str:
    """The settings that decide what is sampled, in one phrase (printed with every result)."""
    steps = "" if decoding["steps"] is None else f", {decoding['steps']} steps"
    if decoding.get("sampler") == "llada":
        return (f"alg {decoding['alg']}{steps}, block_length {decoding['block_length']}, temperature {decoding['temperature']}, "
                f"cfg_scale {decoding['cfg_scale']}")
    return (f"alg {decoding['alg']}{steps}, temperature {decoding['temperature']}, "
            f"top_k {decoding['top_k'] or 'off'}, top_p {decoding['top_p'] if decoding['top_p'] not in (None, 1) else 'off'}")


# The settings one sampler reads and the other does not. Result files leave out those of the sampler not
# used (a threshold recorded beside Dream's sampler would claim an effect it did not have); everything
# else decoding_settings() returns, including keys added later, is recorded.
NOT_READ_BY = {
    "dream": ("threshold", "block_length", "tokens_per_step", "use_cache", "dual_cache"),
    "fast": ("steps", "eps", "alg_temp"),
    "llada": ("top_p", "top_k", "alg_temp", "eps", "threshold", "tokens_per_step", "use_cache", "dual_cache"),
}


def recorded_settings(decoding: dict) -> dict:
    """decoding_settings() as eval, compare and generate --json record it: only what the sampler reads."""
    skip = NOT_READ_BY.get(decoding.get("sampler"), ())
    return {k: v for k, v in decoding.items() if k not in skip}


def sampler_kwargs(decoding: dict) -> dict:
    """decoding_settings() -> keyword arguments of dreamtune.sampling.generate."""
    kw = {k: v for k, v in decoding.items() if k != "sampler"}
    kw["steps"] = kw["steps"] or 0
    return kw


# ------------------------------------------------------------------------------------- model and prompts


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def load_model(path: str, device: str = "auto", dtype: str = "auto", compile: bool = False):
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


def render_prompt(lm, prompt, chat: bool = False, system: str | None = None) -> str:
    """The text the model sees for one prompt: a list of messages goes through the chat template (generation
    prompt added); a string too with chat=True (one user turn, after an optional system turn), else as is."""
    tok = lm.tokenizer
    if isinstance(prompt, str) and chat:
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError("a prompt must be a string or a list of {\"role\", \"content\"} messages")
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}] + prompt
    if not getattr(tok, "chat_template", None):
        raise ValueError("this tokenizer has no chat template, so chat messages cannot be rendered; pass plain text prompts without --chat")
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def encode_prompt(lm, prompt, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of render_prompt(...). Chat-rendered text already holds its special tokens."""
    text = render_prompt(lm, prompt, chat, system)
    templated = isinstance(prompt, list) or chat
    ids = lm.tokenizer.encode(text, add_special_tokens=not templated)
    if not ids:
        raise ValueError("empty prompt: give at least one token of text")
    return ids


def decode_answer(lm, tokens: list[int], skip_special_tokens: bool = False) -> tuple[str, int]:
    """(text up to the first of the model's stop tokens (DiffusionLM.stop_ids), its token count)."""
    stops = set(lm.stop_ids)
    n = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return lm.tokenizer.decode(tokens[:n], skip_special_tokens=skip_special_tokens), n


def batch_seed(seed: int, keys: list[str]) -> int:
    """A batch's generator seed from the run's seed and the batch's row keys: the same rows in the same
    batch draw the same numbers in any run (and on resume), whatever ran before them."""
    return (seed * 1_000_003 + zlib.crc32("\x1f".join(keys).encode())) % (2**63)


def generate_batches(lm, prompts: list[list[int]], decoding: dict, *, batch_size: int, seed: int,
                     keys: list[str] | None = None, on_batch=None) -> list[dict]:
    """Generate for many prompts, batch_size at a time, left-padded. Prompts are grouped by length (less
    padding); results come back in input order as {"tokens", "response", "answer_tokens", "nfe", "time_s"}
    (nfe and time_s are the batch's). on_batch(indices, results) is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    kw = sampler_kwargs(decoding)
    results: list[dict | None] = [None] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=lm.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=lm.device)
        gen = torch.Generator(device=lm.device).manual_seed(batch_seed(seed, [keys[i] for i in idx]))
        t0 = time.perf_counter()
        out = generate(lm, ids, mask, generator=gen, **kw)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        dt = time.perf_counter() - t0
        new = out.sequences[:, width:].tolist()
        done = []
        for row, i in enumerate(idx):
            text, n = decode_answer(lm, new[row])
            results[i] = {"tokens": new[row], "response": text, "answer_tokens": n, "nfe": out.nfe, "time_s": dt}
            done.append(results[i])
        if on_batch is not None:
            on_batch(idx, done)
    return results  # type: ignore[return-value]


def read_prompt_rows(path: Path) -> list[dict]:
    """Rows of a prompts JSONL: each needs `prompt` (string or messages) or `messages`."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise ValueError(f"{path}:{n} needs a 'prompt' (string or list of messages) or 'messages' field")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


# ------------------------------------------------------------------------------------- the verb


def main(argv: list[str] | None = None) -> int:
    ap = parser("dreamtune generate", "Generate text with a diffusion LM (Dream's samplers or the fast sampler).")
    ap.add_argument("prompt", nargs="?", help="the prompt text (or use --input for a JSONL file of prompts)")
    ap.add_argument("--model", required=True, help="model directory (or hub id)")
    ap.add_argument("--chat", action="store_true", help="wrap a text prompt as a user turn in the chat template")
    ap.add_argument("--system", default=None, help="system turn for --chat prompts")
    ap.add_argument("--input", type=Path, help="JSONL of prompts (batch mode)")
    ap.add_argument("--output", type=Path, help="JSONL to write in batch mode")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward in batch mode (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (answer, timing, settings) instead of text")
    add_sampler_args(ap)
    add_model_args(ap)
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.input is None):
        raise ValueError("give either a prompt or --input prompts.jsonl (not both, not neither)")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output out.jsonl")
    if args.output is not None:
        check_writable(args.output)
    decoding = decoding_settings(args)
    rows = read_prompt_rows(args.input) if args.input else [{"prompt": args.prompt}]
    lm = load_model(args.model, args.device, args.dtype, args.compile)
    prompts = [encode_prompt(lm, r.get("prompt", r.get("messages")), args.chat, args.system) for r in rows]

    progress = None
    if args.input is not None:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr)
    t0 = time.perf_counter()
    results = generate_batches(lm, prompts, decoding, batch_size=args.batch_size, seed=args.seed,
                               on_batch=(lambda idx, done: progress.update(len(idx))) if progress else None)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    canvas = len(prompts) * decoding["max_new_tokens"]
    timing = (f"[{len(prompts)} x {decoding['max_new_tokens']} tokens in {elapsed:.2f} s: {canvas / elapsed:.1f} tokens/s; "
              f"answers {sum(r['answer_tokens'] for r in results)} tokens; {describe(decoding)}]")

    if args.input is not None:
        out_rows = [{**row, "response": r["response"], "answer_tokens": r["answer_tokens"], "nfe": r["nfe"]}
                    for row, r in zip(rows, results)]
        write_jsonl(args.output, out_rows)
        print(f"wrote {len(out_rows)} rows to {args.output}", file=sys.stderr)
        print(timing, file=sys.stderr)
        return 0
    r = results[0]
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "response": r["response"],
                          "answer_tokens": r["answer_tokens"], "nfe": r["nfe"], "time_s": round(elapsed, 4),
                          "tokens_per_s": round(canvas / elapsed, 2), "decoding": recorded_settings(decoding),
                          "seed": args.seed},
                         ensure_ascii=False))
    else:
        print(r["response"])
        print(f"{timing[:-1]}; {r['nfe']} forward passes]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
