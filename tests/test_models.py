"""Model layer: bidirectional attention, the shift, Dream/HF loading and export, the Dream tokenizer, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dreamtune import export, models
from dreamtune.tiny import char_tokenizer, tiny_lm


def _ids(lm, L=12, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, lm.config.vocab_size, (B, L), generator=g)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_is_bidirectional(arch, impl):
    lm = tiny_lm(arch=arch)
    lm.model.config._attn_implementation = impl
    x = _ids(lm)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1 - 6) % (lm.config.vocab_size - 6) + 6  # change only the last token
    with torch.no_grad():
        h1, h2 = lm.hidden_states(x), lm.hidden_states(y)
    assert (h1[:, 0] - h2[:, 0]).abs().max() > 1e-4  # the first position sees the last one


def test_dream_shift_scores_position_i_from_output_i_minus_1():
    lm = tiny_lm(shift=True)
    x = _ids(lm)
    with torch.no_grad():
        raw = lm.model(input_ids=x).logits  # [B, L, V] unshifted
        got = lm.logits(x)
    assert torch.allclose(got[:, 1:], raw[:, :-1], atol=1e-6)
    assert torch.allclose(got[:, 0], raw[:, 0], atol=1e-6)


def test_llada_style_no_shift():
    lm = tiny_lm(shift=False)
    x = _ids(lm)
    with torch.no_grad():
        assert torch.allclose(lm.logits(x), lm.model(input_ids=x).logits, atol=1e-6)


def test_logits_at_chosen_positions_match_full_logits():
    lm = tiny_lm()
    x = _ids(lm, B=3)
    pos = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        assert torch.allclose(lm.logits(x, positions=pos), lm.logits(x)[pos], atol=1e-5)


def test_left_padding_matches_unpadded():
    lm = tiny_lm()
    x = _ids(lm, B=1, L=8)
    pad = torch.full((1, 3), lm.tokenizer.pad_token_id)
    xp = torch.cat([pad, x], dim=1)
    am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        # From the second real token on. The first real token is scored from the pad before it (Dream's shift
        # does the same in its own generation); it is always a prompt token, never predicted.
        assert torch.allclose(lm.logits(xp, attention_mask=am)[:, 4:], lm.logits(x)[:, 1:], atol=1e-5)


def test_dream_export_round_trip(tmp_path):
    lm = tiny_lm()
    out = export.save_dream(lm, tmp_path / "dream", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["mask_token_id"] == lm.mask_token_id and "auto_map" in cfg and cfg["rope_theta"] > 0
    back = models.load(out)
    assert type(back.model).__name__ == "Qwen2ForCausalLM" and back.shift and back.mask_token_id == lm.mask_token_id
    assert back.model.config.is_causal is False
    x = _ids(lm)
    with torch.no_grad():
        assert (back.logits(x) - lm.logits(x)).abs().max() <= 1e-5


def test_hf_export_loads_with_automodel(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_lm()
    out = export.save_hf(lm, tmp_path / "hf", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.is_causal is False
    x = _ids(lm)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, lm.model(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_plain_hf_causal_lm_loads_as_diffusion_model(tmp_path, arch):
    """An autoregressive checkpoint without a mask token: attention made bidirectional, shift on, <|mask|> added."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<eos>"] + list("abcdefghij0123456789 "))}
    t = Tokenizer(tm.WordLevel(vocab=vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    cfg = models.tiny_config(len(vocab), arch=arch)
    cfg.is_causal = True  # an ordinary AR checkpoint
    ar = AutoModelForCausalLM.from_config(cfg)
    ar.save_pretrained(tmp_path / "ar")
    tok.save_pretrained(tmp_path / "ar")
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["model_type"] == arch

    lm = models.load(tmp_path / "ar")
    assert lm.shift and lm.model.config.is_causal is False
    # added as a new token after the loaded vocabulary (transformers may add its own specials first)
    assert lm.mask_token_id == len(lm.tokenizer) - 1 >= len(vocab)
    assert lm.model.get_input_embeddings().weight.shape[0] == lm.mask_token_id + 1
    assert lm.tokenizer.convert_tokens_to_ids(models.MASK_TOKEN) == lm.mask_token_id
    x = torch.randint(0, len(vocab), (1, 6))
    x[0, 2] = lm.mask_token_id
    with torch.no_grad():
        assert lm.logits(x).shape == (1, 6, lm.mask_token_id + 1)


def test_dream_tokenizer(dream_tokenizer_dir):
    tok = models.load_tokenizer(dream_tokenizer_dir, {})
    assert tok.convert_tokens_to_ids("<|mask|>") == 151666
    assert tok.eos_token_id == 151643 and tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 151644 and tok.decode(ids).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------- errors


def test_error_no_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        models.load(tmp_path)


def test_error_config_without_weights(tmp_path):
    """A directory with a config but no weight files: one clear error, not transformers' OSError."""
    d = export.save_hf(tiny_lm(seed=0), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        models.load(d)


def test_error_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load(tmp_path / "nope")


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'.*supported"):
        models.load(tmp_path)


def test_error_mask_token_cannot_be_added(tmp_path):
    """No mask id in the config and no tokenizer to add one to."""
    from transformers import AutoModelForCausalLM

    cfg = models.tiny_config(50)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no mask token"):
        models.load(tmp_path)


def test_error_mask_id_outside_vocab(tmp_path):
    lm = tiny_lm()
    out = export.save_hf(lm, tmp_path / "m", dtype=torch.float32)
    (out / models.META_FILE).write_text(json.dumps({"mask_token_id": 10_000, "shift": True}))
    with pytest.raises(ValueError, match="outside the embedding table"):
        models.load(out)


def test_error_weights_cut_short(tmp_path):
    """A safetensors file that a download or save left short is named before any weight is read, by load and by
    the dry run's check alike (not the safetensors library's own error)."""
    out = export.save_hf(tiny_lm(), tmp_path / "m", dtype=torch.float32)
    models.check_model_dir(out)  # whole: fine
    weights = out / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for check in (models.load, models.check_model_dir):
        with pytest.raises(ValueError, match=r"model.safetensors is cut short or damaged .*download or export the model again"):
            check(out)
    weights.write_bytes(b"\x01\x02")  # not even a header
    with pytest.raises(ValueError, match="no readable header"):
        models.load(out)


@pytest.mark.parametrize("name, damage, message", [
    ("config.json", "bytes", r"config.json is not UTF-8 text, so not JSON .*re-download or re-export the model"),
    ("config.json", "dir", r"config.json is a directory, not a file"),
    ("config.json", "list", r"config.json holds a JSON list, not an object"),
    (models.META_FILE, "bytes", r"dreamtune.json is not UTF-8 text, so not JSON .*re-export the model"),
    ("generation_config.json", "bytes", r"generation_config.json is not UTF-8 text"),
])
def test_error_damaged_json_files_are_named(tmp_path, name, damage, message):
    out = export.save_hf(tiny_lm(), tmp_path / "m", dtype=torch.float32)
    path = out / name
    path.unlink(missing_ok=True)
    if damage == "dir":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x81" if damage == "bytes" else b"[1, 2]")
    with pytest.raises(ValueError, match=message):
        models.load(out)


def test_error_hub_id_offline(tmp_path):
    code = ("from dreamtune.cli import main; import sys; "
            f"sys.exit(main(['export', 'some-org/some-model-that-is-not-here', '--out', {str(tmp_path / 'x')!r}]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be fetched" in lines[0] and "pass that directory" in lines[0]
    assert not (tmp_path / "x").exists()


def test_mistyped_local_path_is_named_at_once(tmp_path, monkeypatch):
    """`checkpoints/nope` beside a checkpoints/ folder is a missing local directory, not a hub id to fetch."""
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it looked up on the Hub, the error would say so
    with pytest.raises(FileNotFoundError, match="'checkpoints/nope' does not exist"):
        models.load("checkpoints/nope")


def test_char_tokenizer_round_trip():
    tok = char_tokenizer()
    s = "12 + 34 = 46\nAnswer: 46"
    assert tok.decode(tok(s).input_ids) == s


def test_saved_char_tokenizer_loads_back_unchanged(tmp_path):
    """A generic tokenizer.json must not be re-read as the model type's tokenizer (Qwen2's would drop spaces)."""
    lm = tiny_lm()
    back = models.load(export.save_hf(lm, tmp_path / "m", dtype=torch.float32))
    s = "12 + 3 =\n15"
    assert back.tokenizer(s).input_ids == lm.tokenizer(s).input_ids
    assert back.tokenizer.decode(back.tokenizer(s).input_ids) == s


def test_export_shows_its_progress(tmp_path, capsys):
    """A 7B export writes ~15 GB: the verb shows the shard writer's bar (with the time left)."""
    from dreamtune.cli import main as cli

    src = export.save_hf(tiny_lm(seed=0), tmp_path / "m", dtype=torch.float32)
    assert cli(["export", str(src), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "Writing model shards" in err and "1/1" in err
