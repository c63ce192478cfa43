"""Checkpoints as users download them: the real Dream-v0-Base-7B repository's files (tiny random weights
beside them), a Qwen2.5-Instruct-shaped and a Llama 3-shaped checkpoint, through what a user runs: load,
data validate, train --dry-run, a 3-step train, generate (with and without --chat), export to Dream and HF
formats and load back; exported files read as plain JSON, as transformers 4.46 (Dream's own code) reads them."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from dreamtune import export, models
from dreamtune.cli import main as cli
from tests._hub_checkpoints import LLAMA3_EOS, dream_download, llama3_download, qwen25_download
from tests.conftest import shared_or_skip, write_parquet

pytestmark = pytest.mark.usefixtures("one_thread")

PROBES = ["Hello world, 12+34=46.", "<|im_start|>user\nWhat is 7*8?<|im_end|>\n", "naïve café — 東京 🙂", "  two  spaces\n\ttab"]


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory) -> Path:
    layout = shared_or_skip("hub-layouts", "dream-v0-base-7b")
    tok = shared_or_skip("tokenizer-dream")
    return dream_download(layout, tok, tmp_path_factory.mktemp("hub") / "Dream-v0-Base-7B")


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory) -> Path:
    return qwen25_download(shared_or_skip("tokenizer-dream"), tmp_path_factory.mktemp("hub") / "Qwen2.5-Instruct")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return llama3_download(tmp_path_factory.mktemp("hub") / "Llama-3-Instruct")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}. Answer: {a + b}"} for a, b in
            [(12, 7), (30, 41), (5, 5), (66, 11), (23, 9), (14, 80), (2, 3), (9, 90)]]
    write_parquet(rows, d / "train.parquet")
    write_parquet(rows[:2], d / "val.parquet")
    return d


def _ids(x):
    return x["input_ids"] if hasattr(x, "keys") else x


# ----------------------------------------------------------------------------------------------- Dream


def test_dream_download_loads_whole_and_quietly(dream_dir, dream_tokenizer_dir, caplog):
    from transformers import AutoTokenizer

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        lm = models.load(dream_dir)
    noise = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in noise if "instantiate a model of type" in m or "rope_scaling" in m or "generation flags" in m], noise
    tok = lm.tokenizer
    assert len(tok) == 151_667 and lm.mask_token_id == 151_666 and tok.convert_tokens_to_ids("<|mask|>") == 151_666
    assert tok.eos_token_id == 151_643 and tok.pad_token_id == 151_643 and tok.chat_template
    assert lm.shift and type(lm.model).__name__ == "Qwen2ForCausalLM" and lm.model.config.is_causal is False
    assert lm.model.config.rope_parameters["rope_theta"] == 1e6
    reference = AutoTokenizer.from_pretrained(dream_tokenizer_dir)  # the same BPE, read by transformers itself
    for text in PROBES:
        assert tok.encode(text) == reference.encode(text) and tok.decode(tok.encode(text)) == text
    msgs = [{"role": "user", "content": "1+1?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == reference.apply_chat_template(msgs, tokenize=False)


def test_dream_download_data_validate_and_dry_run(dream_dir, dream_tokenizer_dir, data_dir, tmp_path, capsys):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    out = tmp_path / "validation.json"
    assert cli(["data", "validate", "--data", str(data_dir), "--tokenizer", str(dream_dir), "--max-length", "64",
                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    reference = AutoTokenizer.from_pretrained(dream_tokenizer_dir)
    rows = pq.read_table(data_dir / "train.parquet").to_pylist() + pq.read_table(data_dir / "val.parquet").to_pylist()
    prompt_lens = [len(_ids(reference.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                           add_generation_prompt=True, tokenize=True))) for r in rows]
    assert report["rows"] == 10 and report["prompt"]["min"] == min(prompt_lens) and report["prompt"]["max"] == max(prompt_lens)
    capsys.readouterr()
    code = cli(["train", "--dry-run", f"model.partial_pretrain={dream_dir}", f"data.train_files={data_dir / 'train.parquet'}",
                "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2"])
    printed = capsys.readouterr().out
    assert code == 0 and "tokenizer of 151667 tokens" in printed and "model_type Dream" in printed


def test_dry_run_names_missing_model_and_missing_shard(dream_dir, data_dir, tmp_path, capsys):
    args = [f"data.train_files={data_dir / 'train.parquet'}", "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2"]
    assert cli(["train", "--dry-run", f"model.partial_pretrain={tmp_path / 'nope'}", *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    shard = json.loads((dream_dir / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    for f in dream_dir.iterdir():
        if f.name != shard:
            (partial / f.name).symlink_to(f)
    assert cli(["train", "--dry-run", f"model.partial_pretrain={partial}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks 1 of the" in err[0] and "incomplete" in err[0]


# what each download must read back as: tokenizer length, mask id, and config ids after export
EXPECTED = {
    "dream": dict(tokens=151_667, mask=151_666, eos=151_643, pad=151_643, rope_theta=1e6, formats=("hf", "dream")),
    "qwen25": dict(tokens=151_666, mask=151_665, eos=151_645, pad=151_643, rope_theta=1e6, formats=("hf", "dream")),
    # 40 characters + 6 specials, then <|mask|>; no pad in the config or tokenizer, so pad = eos <|eot_id|>
    "llama3": dict(tokens=47, mask=46, eos=LLAMA3_EOS, pad=LLAMA3_EOS[2], rope_theta=5e5, formats=("hf",)),
}


@pytest.fixture(params=list(EXPECTED))
def download(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_dir")


def test_user_workflow_on_a_download(download, data_dir, tmp_path, capsys):
    """validate -> train (3 steps) -> generate with and without --chat -> export -> load back, per download."""
    kind, src = download
    want = EXPECTED[kind]
    assert cli(["data", "validate", "--data", str(data_dir), "--tokenizer", str(src), "--max-length", "64",
                "--out", str(tmp_path / "validation.json")]) == 0
    run = tmp_path / "run"
    assert cli(["train", f"model.partial_pretrain={src}", f"data.train_files={data_dir / 'train.parquet'}",
                f"data.val_files={data_dir / 'val.parquet'}", "data.max_length=64", "data.train_batch_size=2",
                "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3", "trainer.device=cpu",
                f"trainer.default_local_dir={run}", "trainer.logger=['console']"]) == 0
    final = run / "checkpoint-final"
    capsys.readouterr()
    for model in (src, final):
        for chat in ([], ["--chat"]):
            assert cli(["generate", "--model", str(model), "What is 2+2?", *chat, "--max-new-tokens", "8", "--steps", "4",
                        "--json"]) == 0
            result = json.loads(capsys.readouterr().out)
            assert result["decoding"]["top_k"] == 50 and result["nfe"] >= 1
    source = models.load(src)
    probes = PROBES if kind != "llama3" else ["what is 2+2?\n", "a b c 1 2 3"]
    x = torch.tensor([source.tokenizer.encode(probes[0])])
    trained = models.load(final, dtype="fp32")
    for fmt in want["formats"]:
        out = tmp_path / f"export-{fmt}"
        assert cli(["export", str(final), "--out", str(out), "--format", fmt, "--dtype", "fp32"]) == 0
        cfg = json.loads((out / "config.json").read_text())
        tcfg = json.loads((out / "tokenizer_config.json").read_text())
        # what transformers 4.46 reads: rope_theta/rope_scaling, the template in tokenizer_config.json, the ids
        assert cfg["rope_theta"] == want["rope_theta"] and "rope_scaling" in cfg
        assert cfg["eos_token_id"] == want["eos"] and cfg["pad_token_id"] == want["pad"] and cfg["mask_token_id"] == want["mask"]
        assert cfg["bos_token_id"] == json.loads((src / "config.json").read_text())["bos_token_id"]
        assert tcfg["chat_template"] == source.tokenizer.chat_template
        assert tcfg["tokenizer_class"] != "TokenizersBackend" and "auto_map" not in tcfg
        assert json.loads((out / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())
        if kind != "llama3":  # Qwen2's BPE files travel, so a slow tokenizer built on them (Dream's) reads the export
            assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
        if fmt == "dream":
            assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
        back = models.load(out, dtype="fp32")
        assert len(back.tokenizer) == want["tokens"] and back.mask_token_id == want["mask"] and back.shift
        assert back.stop_ids == source.stop_ids
        assert all(back.tokenizer.encode(t) == source.tokenizer.encode(t) for t in probes)
        with torch.no_grad():
            assert (back.logits(x) - trained.logits(x)).abs().max() <= 1e-5
    if "dream" not in want["formats"]:
        assert cli(["export", str(final), "--out", str(tmp_path / "d"), "--format", "dream"]) == 2
        assert "needs a Qwen2-architecture model" in capsys.readouterr().err


def test_export_refuses_a_broken_tokenizer(dream_dir, tmp_path):
    """An export must never be worse than its source: a tokenizer missing the model's mask id is refused."""
    lm = models.load(dream_dir)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tm

    lm.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel(vocab={"a": 0, "b": 1}, unk_token="a")))
    with pytest.raises(ValueError, match="has 2 tokens, but config.json's eos_token_id is 151643"):
        export.save_hf(lm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_broken_or_empty_tokenizer_is_an_error_naming_the_files(dream_dir, tmp_path):
    from tokenizers import Tokenizer, models as tm

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dream_dir.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "vocab.json").unlink()
    (broken / "vocab.json").write_text("{}")  # a vocabulary the BPE cannot be built from
    with pytest.raises(ValueError, match=r"broken \(vocab.json, tokenizer_config.json, merges.txt"):
        models.load(broken)
    # a tokenizer.json that reads but holds one token: every text encodes to nothing useful
    Tokenizer(tm.WordLevel(vocab={"<|endoftext|>": 0}, unk_token="<|endoftext|>")).save(str(broken / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer read from .*broken \(tokenizer.json.*encodes plain text"):
        models.load(broken)


# ----------------------------------------------------------------------------------------------- Qwen2.5, Llama 3


def test_qwen25_padded_table_gets_an_initialised_mask_row(qwen25_dir):
    from safetensors.torch import load_file

    lm = models.load(qwen25_dir)
    assert lm.mask_token_id == 151_665 and len(lm.tokenizer) == 151_666
    emb, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    assert emb.shape[0] == 152_064  # the padded table: no resize
    raw = {}
    for f in sorted(qwen25_dir.glob("model-*.safetensors")):
        raw |= load_file(str(f))
    assert not torch.equal(raw["model.embed_tokens.weight"][151_665], emb[151_665].detach())  # it was changed
    torch.testing.assert_close(emb[151_665], raw["model.embed_tokens.weight"][:151_665].mean(0))
    torch.testing.assert_close(head[151_665], raw["lm_head.weight"][:151_665].mean(0))
    torch.testing.assert_close(emb[:151_665], raw["model.embed_tokens.weight"][:151_665])  # the rest untouched
    assert {151_643, 151_645} <= set(lm.stop_ids)


def _always_predicts(lm, token: int):
    """Make the model predict `token` everywhere with certainty (a head with a bias)."""
    H, V = lm.model.get_output_embeddings().weight.shape[1], lm.model.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[token] = 30.0
    lm.model.lm_head = head
    return lm


@pytest.mark.parametrize("eos", LLAMA3_EOS)
@pytest.mark.parametrize("alg", ["fast", "maskgit_plus"])
def test_llama3_decoding_stops_at_each_eos_id(llama3_dir, eos, alg):
    from dreamtune.engine import FastSampler, DreamSampler, generate_batches

    lm = models.load(llama3_dir)
    assert lm.tokenizer.eos_token_id == LLAMA3_EOS[2] and set(LLAMA3_EOS) <= set(lm.stop_ids)
    assert lm.model.config.rope_parameters["rope_type"] == "llama3"
    _always_predicts(lm, eos)
    prompt = lm.tokenizer.encode("what is 2+2?")
    sampler = FastSampler(block_length=8) if alg == "fast" else DreamSampler(alg=alg, steps=24)
    (r,) = generate_batches(lm, [prompt], sampler, max_new_tokens=24, batch_size=1, seed=0)
    assert r["answer_tokens"] == 0 and r["response"] == "" and r["tokens"][0] == eos
    if alg == "fast":  # the first block ends the answer: one step (all revealed at once), the rest filled
        assert r["nfe"] == 1
