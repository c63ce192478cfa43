"""`dreamtune generate`: text from a prompt, or from a JSONL file of prompts; and the command-line options
that `dreamtune eval` and `dreamtune compare` share (the sampler's and the model's). The generation itself
is dreamtune.engine's.

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
import sys
import time
from pathlib import Path

from dreamtune.atomic import check_writable, write_jsonl
from dreamtune.cli import parser, positive_int  # noqa: F401  (parser: verbs import it from here too)
from dreamtune.data import json_lines
from dreamtune.engine import (
    ALGS,
    DreamSampler,
    FastSampler,
    LLaDASampler,
    describe,
    encode_prompt,
    generate_batches,
    load_for_generation,
    record,
)

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
    g.add_argument("--alg", default="entropy", choices=list(ALGS), help="Dream's algorithms, fast (Fast-dLLM style), or LLaDA's "
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


def sampler_from_args(args):
    """The sampler the command line asks for (--alg picks it; each takes only its own settings)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or a positive number of tokens, got {args.top_k}")
    name = ALGS[args.alg]
    if args.cfg_scale and name != "llada":
        raise ValueError(f"--cfg-scale is a setting of LLaDA's sampler; use --alg low_confidence or random, not {args.alg}")
    steps = args.max_new_tokens if args.steps is None else args.steps
    if name == "llada":  # no top-p/top-k filter in LLaDA's sampler
        return LLaDASampler(alg=args.alg, steps=steps, block_length=args.block_length, temperature=args.temperature,
                            cfg_scale=args.cfg_scale)
    token = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    if name == "fast":
        return FastSampler(threshold=args.threshold, block_length=args.block_length, tokens_per_step=args.tokens_per_step,
                           use_cache=not args.no_cache, dual_cache=args.dual_cache, **token)
    return DreamSampler(alg=args.alg, steps=steps, alg_temp=args.alg_temp, eps=args.eps, **token)


# ------------------------------------------------------------------------------------- prompts files


def read_prompts_text(path: Path) -> str:
    """The text of a prompts file; an error naming it when it is missing, a directory or not UTF-8 text."""
    if path.is_dir():
        raise IsADirectoryError(f"prompts file '{path}' is a directory; pass a file of prompts")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompts file '{path}' is not UTF-8 text; pass a JSONL or text file of prompts") from None


def read_prompt_rows(path: Path) -> list[dict]:
    """Rows of a prompts JSONL: each needs `prompt` (string or messages) or `messages`."""
    text = read_prompts_text(path)
    rows = []
    for n, row in json_lines(path, text, "a JSON object with a 'prompt' or 'messages' field"):
        if not ("prompt" in row or "messages" in row):
            raise ValueError(f"{path}:{n}: row has no 'prompt' or 'messages' field; each row needs 'prompt' (a string or a "
                             "list of messages) or 'messages'")
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
    sampler, n_new = sampler_from_args(args), args.max_new_tokens
    rows = read_prompt_rows(args.input) if args.input else [{"prompt": args.prompt}]
    lm = load_for_generation(args.model, args.device, args.dtype, args.compile)
    prompts = [encode_prompt(lm.tokenizer, r.get("prompt", r.get("messages")), args.chat, args.system) for r in rows]

    progress = None
    if args.input is not None:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr)
    t0 = time.perf_counter()
    results = generate_batches(lm, prompts, sampler, max_new_tokens=n_new, batch_size=args.batch_size, seed=args.seed,
                               on_batch=(lambda idx, done: progress.update(len(idx))) if progress else None)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    canvas = len(prompts) * n_new
    timing = (f"[{len(prompts)} x {n_new} tokens in {elapsed:.2f} s: {canvas / elapsed:.1f} tokens/s; "
              f"answers {sum(r['answer_tokens'] for r in results)} tokens; {describe(sampler, n_new)}]")

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
                          "tokens_per_s": round(canvas / elapsed, 2), "decoding": record(sampler, n_new),
                          "seed": args.seed},
                         ensure_ascii=False))
    else:
        print(r["response"])
        print(f"{timing[:-1]}; {r['nfe']} forward passes]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
