"""The whole user workflow on a LLaDA-format checkpoint, on CPU, through the real CLI: data prepare and
validate with LLaDA's tokenizer, train with LLaDA's objective, stop and resume (the resumed run's losses
equal an unbroken run's), generate with LLaDA's sampler and the fast sampler, eval on a local benchmark
file, compare base vs tuned, export to LLaDA's format and load back, and the demo page built (not served).

The checkpoint is the real LLaDA-8B-Instruct repository's small files (../shared/data/hub-layouts) with its
shape keys shrunk and tiny random weights under LLaDA's names (tests/_hub_checkpoints.py).

    python -m pytest -q tests/test_llada_workflow.py     # about a minute on 2 cores
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dreamtune import models
from dreamtune.cli import main as cli
from tests._hub_checkpoints import EOS, EOT, MASK, llada_download
from tests.conftest import addition_rows, shared_or_skip
from tests.test_train import metrics

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = Path("models/LLaDA-8B-Instruct")
MAX_LENGTH = 48
# LLaDA's sampler as d1 runs it, shrunk: blocks of 8, steps = gen_length / 2, greedy
LLADA_DECODE = ["--max-new-tokens", "16", "--steps", "8", "--alg", "low_confidence", "--block-length", "8",
                "--temperature", "0"]
TRAIN = ["model.partial_pretrain=" + str(BASE), "data.train_files=[data/s1k_llada/train.parquet]",
         "data.val_files=[data/s1k_llada/val.parquet]", f"data.max_length={MAX_LENGTH}", "data.train_batch_size=2",
         "data.micro_batch_size_per_gpu=2", "optim.lr=1e-3", "trainer.total_training_steps=4",
         "trainer.save_checkpoint_steps=2", "trainer.val_check_steps=0", "trainer.logger=['console']",
         "trainer.device=cpu", "diffusion.objective=llada", "model.dtype=fp32"]


def run(*argv) -> None:
    assert cli([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A user's folder: the download in models/, the data prepared and validated, benchmark files in
    ./data/eval, and two training runs of 4 steps: runs/whole unbroken, runs/parts stopped after 2 and resumed."""
    root = tmp_path_factory.mktemp("llada-workflow")
    llada_download(shared_or_skip("hub-layouts", "llada-8b-instruct"), root / BASE)
    old_cwd, old_env = Path.cwd(), os.environ.pop("DREAMTUNE_EVAL_DATA", None)
    os.chdir(root)
    try:
        Path("data/eval/gsm8k").mkdir(parents=True)
        Path("data/s1k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_rows(20)))
        Path("data/eval/gsm8k/test.jsonl").write_text(
            json.dumps({"question": "Tom has 3 apples and buys 4. How many now?", "answer": "3 + 4 = 7\n#### 7"}) + "\n"
            + json.dumps({"question": "A box holds 6 eggs. How many in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"}) + "\n")
        run("data", "prepare", "--input", "data/s1k.jsonl", "--format", "generic", "--val-fraction", "0.1",
            "--seed", "0", "--out", "data/s1k_llada")
        run("data", "validate", "--data", "data/s1k_llada", "--tokenizer", BASE, "--max-length", MAX_LENGTH)
        run("train", *TRAIN, "trainer.default_local_dir=runs/whole")
        run("train", *TRAIN, "trainer.default_local_dir=runs/parts", "trainer.max_steps_this_run=2")
        assert not Path("runs/parts/checkpoint-final").exists()  # it stopped, as asked, after step 2
        run("train", *TRAIN, "trainer.default_local_dir=runs/parts", "trainer.resume_training=true")
    finally:
        os.chdir(old_cwd)
        if old_env is not None:
            os.environ["DREAMTUNE_EVAL_DATA"] = old_env
    return root


@pytest.fixture
def in_root(root, monkeypatch):
    monkeypatch.chdir(root)
    monkeypatch.delenv("DREAMTUNE_EVAL_DATA", raising=False)
    return root


def test_validate_train_and_resume(in_root):
    report = json.loads(Path("data/s1k_llada/validation.json").read_text())
    assert report["max_length"] == MAX_LENGTH
    assert Path("runs/parts/data_validation.json").read_text() == Path("data/s1k_llada/validation.json").read_text()
    whole, parts = metrics("runs/whole"), metrics("runs/parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    assert [r["loss"] for r in whole] == [r["loss"] for r in parts]  # bitwise: the resume is exact
    assert all(r["loss"] > 0 for r in parts)
    tuned = models.load("runs/parts/checkpoint-final", dtype="fp32")
    assert tuned.shift is False and tuned.mask_token_id == MASK and {EOS, EOT} <= set(tuned.stop_ids)
    assert json.loads(Path("runs/parts/checkpoint-final/config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("sampler", ["llada", "fast"])
def test_generate_from_the_tuned_checkpoint(in_root, sampler, capsys, caplog):
    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # transformers warns once per process: an earlier verb must not hide it here
    decode = LLADA_DECODE if sampler == "llada" else ["--max-new-tokens", "16", "--alg", "fast", "--block-length", "8",
                                                      "--threshold", "0.9", "--dual-cache", "--temperature", "0"]
    capsys.readouterr()
    run("generate", "--model", "runs/parts/checkpoint-final", "What is 2+2?", "--chat", "--json", *decode)
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert "clean_up_tokenization_spaces" not in err + caplog.text  # LLaDA's tokenizer_config asks for a clean-up BPE skips: no warning
    assert row["decoding"]["sampler"] == sampler and row["decoding"]["block_length"] == 8
    if sampler == "llada":
        assert row["decoding"]["steps"] == 8 and row["nfe"] == 8 and row["decoding"]["alg"] == "low_confidence"
    else:
        assert row["decoding"]["dual_cache"] is True and 2 <= row["nfe"] <= 16  # at least one step per block
    assert isinstance(row["response"], str) and row["answer_tokens"] == 16


def test_eval_and_compare_with_llada_sampler(in_root):
    run("eval", "--model", "runs/parts/checkpoint-final", "--tasks", "gsm8k", "--prompt-format", "chat",
        "--out", "results/eval_results.json", "--grade-workers", "0", "--batch-size", "2", *LLADA_DECODE)
    ev = json.loads(Path("results/eval_results.json").read_text())
    assert ev["tasks"]["gsm8k"]["total"] == 2 and ev["data_dir"] == str(Path("data") / "eval")
    assert ev["decoding"]["sampler"] == "llada" and ev["decoding"]["block_length"] == 8
    assert "top_k" not in ev["decoding"] and "threshold" not in ev["decoding"]
    samples = [json.loads(x) for x in Path("results/eval_results.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["answer_tokens"] == 16 and s["nfe"] == 8 for s in samples)
    assert all(s["prompt"].startswith("<|startoftext|><|start_header_id|>system") for s in samples)  # LLaDA's template

    run("compare", "--base", BASE, "--tuned", "runs/parts/checkpoint-final", "--task", "gsm8k", "--n", "2",
        "--prompt-format", "chat", "--out", "results/compare.json", "--batch-size", "2", *LLADA_DECODE)
    cmp = json.loads(Path("results/compare.json").read_text())
    assert [r["answer"] for r in cmp["rows"]] == ["7", "12"] and cmp["decoding"]["sampler"] == "llada"
    assert cmp["base"] == str(BASE) and cmp["tuned"] == "runs/parts/checkpoint-final"


def test_export_to_llada_format_and_load_back(in_root):
    run("export", "runs/parts/checkpoint-final", "--out", "exports/llada", "--format", "llada", "--dtype", "fp32")
    cfg = json.loads(Path("exports/llada/config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["mask_token_id"] == MASK and cfg["d_model"] == 32
    tcfg = json.loads(Path("exports/llada/tokenizer_config.json").read_text())
    assert tcfg["clean_up_tokenization_spaces"] is True  # as LLaDA's own, so LLaDA's code decodes as it always did
    tuned, back = models.load("runs/parts/checkpoint-final", dtype="fp32"), models.load("exports/llada")
    assert back.shift is False and back.mask_token_id == MASK and back.stop_ids == tuned.stop_ids
    x = torch.tensor([[126_080, 11, 12, 13] + [MASK] * 4])
    with torch.no_grad():
        assert (back.logits(x) - tuned.logits(x)).abs().max().item() <= 1e-6
        assert (back.logits(x) - models.load(BASE).logits(x)).abs().max().item() > 0  # training changed it


def test_demo_page_is_built_for_the_tuned_model(in_root, monkeypatch):
    gr = pytest.importorskip("gradio", reason="pip install 'dreamtune[demo]'")
    from dreamtune import demo

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, blocks=self))
    run("demo", "--model", "runs/parts/checkpoint-final")
    assert isinstance(launched["blocks"], gr.Blocks) and launched["server_name"] == "127.0.0.1"
    # what the page's Run button streams, on this model: canvases filling in, then the answer
    lm = demo.load_model("runs/parts/checkpoint-final")
    assert "low_confidence" in demo.ALGS  # LLaDA's own sampler is on the page
    for alg in ("maskgit_plus", "fast", "low_confidence"):
        frames = list(demo.denoise_stream(lm, "What is 2+2?", alg=alg, steps=8, max_new_tokens=8))
        assert frames[0][0] == demo.MASK_GLYPH * 8 and frames[-1][1].startswith("done:"), frames[-1]
        assert demo.MASK_GLYPH not in frames[-1][0]
