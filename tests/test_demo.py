"""`dreamtune demo`: the streaming function without a browser, then the page in headless Chromium
(Playwright driving Debian's /usr/bin/chromium; never `playwright install`).

    pytest tests/test_demo.py                  # the browser tests skip when chromium or playwright is absent
    pytest tests/test_demo.py -m "not browser"
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

import pytest

from dreamtune import demo as D
from dreamtune.cli import main as cli_main
from dreamtune.tiny import tiny_lm

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def lm():
    # random weights: the answers are gibberish, but each is a deterministic function of prompt and seed
    return tiny_lm(hidden_size=32, layers=1, max_positions=96, seed=0)


def final(lm, prompt, **kw):
    return list(D.denoise_stream(lm, prompt, **kw))[-1]


def test_stream_shows_every_step_then_the_answer(lm):
    frames = list(D.denoise_stream(lm, "12+34=?", steps=8, max_new_tokens=16))
    assert frames[0][0] == D.MASK_GLYPH * 16  # all masked before the first step
    steps = frames[1:-1]  # the canvas after each step
    assert len(steps) == 8 and all(status.startswith(f"step {i},") for i, (_, status) in enumerate(steps, 1))
    masked = [text.count(D.MASK_GLYPH) for text, _ in steps]
    assert masked == sorted(masked, reverse=True) and 0 < masked[0] < 16 and masked[-1] == 0  # filling in
    answer, status = frames[-1]
    assert D.MASK_GLYPH not in answer and status.startswith("done: 8 forward passes")


def test_stream_shows_the_fast_samplers_steps(lm):
    """The fast sampler's cached steps never call the decoder's forward: the frames come from on_step."""
    frames = list(D.denoise_stream(lm, "12+34=?", alg="fast", threshold=1.0, max_new_tokens=16))
    steps = frames[1:-1]
    nfe = int(frames[-1][1].split()[1])
    assert len(steps) == nfe >= 2  # threshold 1.0: one position per step, until an all-eos block stops it
    masked = [text.count(D.MASK_GLYPH) for text, _ in steps]
    assert masked == sorted(masked, reverse=True) and masked[0] < 16


def test_interleaved_requests_do_not_share_state(lm):
    """Two streams consumed in lockstep, as two users' requests interleave on a server, each end where it
    ends alone: own canvas, own sampling generator (temperature 1 makes the generator matter)."""
    kw = {"temperature": 1.0, "steps": 12, "max_new_tokens": 12}
    alone = [final(lm, "12+34=?", seed=1, **kw), final(lm, "99+1=?", seed=2, **kw)]
    lock = threading.Lock()  # what a server's requests share
    a = D.denoise_stream(lm, "12+34=?", seed=1, lock=lock, **kw)
    b = D.denoise_stream(lm, "99+1=?", seed=2, lock=lock, **kw)
    frames = ([], [])
    for fa, fb in itertools.zip_longest(a, b):
        for got, f in zip(frames, (fa, fb)):
            if f is not None:
                got.append(f)
    assert frames[0][-1][0] == alone[0][0]
    assert frames[1][-1][0] == alone[1][0]
    for got in frames:  # one frame per forward pass of its own generation, no more (none of the other's)
        nfe = int(got[-1][1].split()[1])
        assert len(got) == nfe + 2 and got[-1][1].startswith("done:")


def test_prompts_beyond_the_context_are_refused(lm):
    frames = list(D.denoise_stream(lm, "1" * 200, max_new_tokens=32))
    assert len(frames) == 1 and frames[0][1].startswith("Prompt refused:") and "96 tokens" in frames[0][1]
    assert "Type a prompt" in list(D.denoise_stream(lm, "   "))[0][1]
    assert list(D.denoise_stream(lm, "1+1=?", alg="nope"))[-1][1].startswith("Not run: unknown alg 'nope'")


def test_render_canvas_marks_masks_and_hides_eos(lm):
    tok = lm.tokenizer
    ids = tok("ab", add_special_tokens=False).input_ids
    assert D.render_canvas(tok, [ids[0], lm.mask_token_id, ids[1], tok.eos_token_id], lm.mask_token_id) == f"a{D.MASK_GLYPH}b"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert D.render_canvas(tok, [ids[0], im_end, ids[1]], lm.mask_token_id, lm.stop_ids) == "ab"


def test_cli_binds_localhost_by_default(monkeypatch, lm):
    launched = {}

    class FakeApp:
        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(D, "load_model", lambda path: lm)
    monkeypatch.setattr(D, "build_app", lambda *a, **kw: FakeApp())
    assert cli_main(["demo", "--model", "x"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860 and launched["share"] is False
    assert cli_main(["demo", "--model", "x", "--host", "0.0.0.0", "--port", "8080"]) == 0
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 8080


def test_cli_mistakes_are_one_error_line(capsys, tmp_path):
    assert cli_main(["demo"]) == 2
    assert cli_main(["demo", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    assert "--model" in err[0] and "does not exist" in err[1]


# ------------------------------------------------------------------------------------------- in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lm):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'dreamtune[demo]')")
    port = _free_port()
    app = D.build_app(lm, min_seconds=3.0, max_new_tokens=24, steps=24)  # slow enough to watch the steps
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _watch(pages, timeout=60.0):
    """Poll each page's canvas until its status says done; return each page's distinct canvases."""
    seen = [[] for _ in pages]
    done = [False] * len(pages)
    t0 = time.time()
    while not all(done) and time.time() - t0 < timeout:
        for i, page in enumerate(pages):
            if done[i]:
                continue
            text = page.input_value("#canvas textarea")
            if not seen[i] or seen[i][-1] != text:
                seen[i].append(text)
            done[i] = page.inner_text("#status").startswith("done")
        time.sleep(0.03)
    assert all(done), f"not done after {timeout}s: {[s[-1:] for s in seen]}"
    for i, page in enumerate(pages):  # the final answer as the page shows it once done
        seen[i].append(page.input_value("#canvas textarea"))
    return seen


def _run(page, url, prompt, seed):
    page.goto(url)
    page.fill("#prompt textarea", prompt)
    page.fill("#seed input", str(seed))
    page.click("#run")


@pytest.mark.browser
def test_page_denoises_step_by_step(server, browser, lm, tmp_path):
    page = browser.new_page()
    _run(page, server, "12+34=?", 0)
    seen = _watch([page])[0]
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    intermediate = [t for t in seen if D.MASK_GLYPH in t and t.strip(D.MASK_GLYPH)]
    assert len(intermediate) >= 3, f"too few partly denoised canvases seen: {seen}"
    expected = final(lm, "12+34=?", steps=24, max_new_tokens=24)[0]
    assert seen[-1] == expected and D.MASK_GLYPH not in seen[-1]
    assert "forward passes" in page.inner_text("#status")


@pytest.mark.browser
def test_concurrent_users_get_their_own_answers(server, browser, lm):
    a, b = browser.new_page(), browser.new_page()
    _run(a, server, "12+34=?", 1)
    _run(b, server, "9+9=?", 2)  # submitted while the first is still denoising
    seen_a, seen_b = _watch([a, b])
    assert seen_a[-1] == final(lm, "12+34=?", seed=1, steps=24, max_new_tokens=24)[0]
    assert seen_b[-1] == final(lm, "9+9=?", seed=2, steps=24, max_new_tokens=24)[0]
    assert seen_a[-1] != seen_b[-1]


@pytest.mark.browser
def test_page_refuses_a_prompt_beyond_the_context(server, browser):
    page = browser.new_page()
    _run(page, server, "7" * 120, 0)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Prompt refused')", timeout=20_000)
    assert page.input_value("#canvas textarea") == ""
