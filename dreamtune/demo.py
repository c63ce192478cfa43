"""`dreamtune demo`: a web page where you type a prompt and watch the answer being denoised.

    dreamtune demo --model runs/quickstart/tuned/checkpoint-final
    dreamtune demo --model DIR --host 0.0.0.0 --port 8080     # reachable from other machines
    dreamtune demo --model DIR --share                        # a public gradio.live link

The page (Gradio) has a prompt box, the sampler's settings (algorithm, steps, max new tokens,
temperature, the fast sampler's confidence threshold, seed) and a Run button. The answer canvas is shown
live, at every denoising step, masked positions as `░`, so you watch them fill in; the status line
gives the step and the time taken.

It binds 127.0.0.1 unless --host says otherwise. Prompts that do not fit the model's context
(max_position_embeddings minus max new tokens) are refused with a message on the page. Concurrent users
never share a canvas or a random generator: every request builds its own; only the model's forward
passes take turns, behind a lock. A leaf: nothing in dreamtune imports it.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time

from dreamtune.cli import parser

MASK_GLYPH = "░"
# Requests that pass no lock of their own take turns on this one: one generation uses the model at a time.
_MODEL_LOCK = threading.Lock()
ALGS = ("maskgit_plus", "entropy", "topk_margin", "origin", "fast", "low_confidence", "random")  # LLaDA's last
# The shortest time the steps of one answer take on the page: a tiny model on a CPU finishes its steps
# faster than an eye (or a browser's redraw) can follow. A large model is slower than this anyway.
MIN_SECONDS = 1.5


def render_canvas(tokenizer, tokens, mask_id: int, stop_ids=()) -> str:
    """The answer region of a canvas as text: masks as MASK_GLYPH, eos/pad and the other stop tokens hidden,
    the rest decoded in runs (a BPE token decoded alone can differ from the same token inside its word)."""
    hidden = {tokenizer.eos_token_id, *stop_ids}
    out, run = [], []

    def flush():
        if run:
            out.append(tokenizer.decode(run, skip_special_tokens=False))
            run.clear()

    for t in tokens:
        if t == mask_id:
            flush()
            out.append(MASK_GLYPH)
        elif t in hidden:
            flush()
        else:
            run.append(t)
    flush()
    return "".join(out)


def context_limit(lm, max_new_tokens: int) -> int:
    """How many prompt tokens fit beside max_new_tokens in the model's context."""
    return int(getattr(lm.config, "max_position_embeddings", 2048)) - int(max_new_tokens)


def denoise_stream(lm, prompt: str, *, alg: str = "maskgit_plus", steps: int = 32, max_new_tokens: int = 32,
                   temperature: float = 0.0, threshold: float = 0.9, seed: int = 0, chat: bool = True,
                   lock: threading.Lock | None = None, min_seconds: float = 0.0):
    """Yield (canvas text, status) while one request is denoised, then (final answer, "done: ...").

    The canvases are the real ones, live: the generation runs in a worker thread, and the sampler's
    on_step callback hands the canvas after every step to this request's queue. The generation runs
    while this request holds `lock`, which a server's requests share so that only one generation uses the
    model at a time; the request's generator, canvas, queue and results are its own. `min_seconds` spreads the frames over at least that long, so a tiny model's
    steps can be watched. A prompt that does not fit the context, or a bad setting, yields one message."""
    import torch

    from dreamtune.engine import decode_answer, encode_prompt, generate, sampler_with

    prompt = (prompt or "").strip()
    if not prompt:
        yield "", "Type a prompt first."
        return
    steps, max_new_tokens, seed = int(steps), int(max_new_tokens), int(seed)
    ids = encode_prompt(lm.tokenizer, prompt, chat=bool(chat and getattr(lm.tokenizer, "chat_template", None)))
    limit = context_limit(lm, max_new_tokens)
    if len(ids) > limit:
        yield "", (f"Prompt refused: it is {len(ids)} tokens, and this model's context "
                   f"({lm.config.max_position_embeddings} tokens) minus {max_new_tokens} new tokens leaves room "
                   f"for {max(limit, 0)}. Shorten the prompt or lower max new tokens.")
        return
    p = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=lm.device)  # [1, P]
    generator = torch.Generator(device=lm.device.type).manual_seed(seed)
    frames: queue.Queue = queue.Queue()  # answer-region token lists, then None when the worker ends
    result: dict = {}

    def work():
        try:
            with lock if lock is not None else _MODEL_LOCK:
                t0 = time.time()
                sampler = sampler_with(alg, steps=steps, temperature=float(temperature), threshold=float(threshold))
                result["out"] = generate(lm, input_ids, None, sampler, max_new_tokens=max_new_tokens,
                                         generator=generator, on_step=lambda x: frames.put(x[0, p:].tolist()))
                result["time_s"] = time.time() - t0
        except Exception as e:  # handed to the request's own generator below
            result["error"] = e
        finally:
            frames.put(None)

    t_start = time.time()
    yield MASK_GLYPH * max_new_tokens, f"denoising {max_new_tokens} tokens..."
    threading.Thread(target=work, name="dreamtune-demo-generate", daemon=True).start()
    pause = min_seconds / max(steps, 1) if min_seconds else 0.0
    n = 0
    while (tokens := frames.get()) is not None:
        n += 1
        yield render_canvas(lm.tokenizer, tokens, lm.mask_token_id, lm.stop_ids), f"step {n}, {time.time() - t_start:.2f} s"
        if pause:
            time.sleep(pause)
    if "error" in result:
        if isinstance(result["error"], ValueError):  # a bad setting: say so on the page
            yield "", f"Not run: {result['error']}"
            return
        raise result["error"]
    out = result["out"]
    answer, _ = decode_answer(lm, out.sequences[0, p:].tolist(), skip_special_tokens=True)
    yield answer, f"done: {out.nfe} forward passes, {result['time_s']:.2f} s"


def build_app(lm, title: str = "dreamtune demo", min_seconds: float = MIN_SECONDS, max_new_tokens: int | None = None,
              steps: int | None = None):
    """The Gradio Blocks page for one loaded model; max_new_tokens and steps are the sliders' first values."""
    import gradio as gr

    lock = threading.Lock()  # the model's forward passes take turns; nothing else is shared
    ctx = int(getattr(lm.config, "max_position_embeddings", 2048))
    default_new = max_new_tokens or min(64, max(1, ctx // 4))
    default_steps = steps or default_new

    def run(prompt, alg, steps, max_new_tokens, temperature, threshold, seed, chat):
        yield from denoise_stream(lm, prompt, alg=alg, steps=steps, max_new_tokens=max_new_tokens,
                                  temperature=temperature, threshold=threshold, seed=seed, chat=chat, lock=lock,
                                  min_seconds=min_seconds)

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nModel: `{lm.source}` (context {ctx} tokens). The answer is denoised step by step; "
                    f"`{MASK_GLYPH}` marks positions still masked.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=4, placeholder="e.g. 47+38=?", elem_id="prompt")
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
                canvas = gr.Textbox(label="Answer (denoising)", lines=8, interactive=False, elem_id="canvas",
                                    autoscroll=False)
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                alg = gr.Dropdown(list(ALGS), value="maskgit_plus", label="Algorithm", elem_id="alg")
                steps = gr.Slider(1, max(512, default_steps), value=default_steps, step=1, label="Steps (Dream's algorithms)", elem_id="steps")
                max_new = gr.Slider(1, max(1, ctx - 1), value=default_new, step=1, label="Max new tokens", elem_id="max_new")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                threshold = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Confidence threshold (fast sampler)")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                chat = gr.Checkbox(value=True, label="Chat template")
        inputs = [prompt, alg, steps, max_new, temperature, threshold, seed, chat]
        run_btn.click(run, inputs, [canvas, status])
        prompt.submit(run, inputs, [canvas, status])
    # several requests in flight at once; they interleave at the model lock, each with its own state
    app.queue(default_concurrency_limit=8)
    return app


def load_model(model_dir: str):
    """The model on the GPU if there is one (bf16), else the CPU (fp32)."""
    from dreamtune.engine import load_for_generation

    return load_for_generation(model_dir)


def main(argv: list[str] | None = None) -> int:
    p = parser("dreamtune demo", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (e.g. RUN/checkpoint-final) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="the page's first value (default 64): use the canvas the model was trained to fill")
    p.add_argument("--steps", type=int, default=None, help="the page's first value (default: max new tokens)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    for name in ("max_new_tokens", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    lm = load_model(args.model)
    if args.max_new_tokens is not None and context_limit(lm, args.max_new_tokens) < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                         f"({lm.config.max_position_embeddings} tokens)")
    app = build_app(lm, max_new_tokens=args.max_new_tokens, steps=args.steps)
    print(f"dreamtune demo: {args.model} on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, quiet=True,
               footer_links=[])
    return 0


if __name__ == "__main__":
    from dreamtune.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
