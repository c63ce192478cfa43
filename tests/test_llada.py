"""LLaDA natively: a checkpoint in LLaDA's own format (the real LLaDA-8B-Instruct repository's small files from
../shared/data/hub-layouts, tiny random weights under LLaDA's parameter names beside them) loads into
transformers' Llama with the logits of the same weights mapped by hand, attends both ways, exports to LLaDA's
format and loads back; LLaDA's sampler follows its reference algorithm.

    python -m pytest -q -x tests/test_llada.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dreamtune import models
from dreamtune.cli import main as cli
from tests._hub_checkpoints import BOS, EOS, EOT, MASK, llada_download
from tests._hub_checkpoints import LLADA_TINY as TINY
from tests.conftest import shared_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> Path:
    return llada_download(shared_or_skip("hub-layouts", "llada-8b-instruct"), tmp_path_factory.mktemp("hub") / "LLaDA-8B-Instruct")


@pytest.fixture(scope="module")
def llada(llada_dir):
    return models.load(llada_dir)


def raw_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd |= load_file(str(f))
    return sd


def by_hand(d: Path):
    """The checkpoint's weights put into a transformers Llama by a mapping written out here, independently of
    dreamtune.llada: LLaDA's modules and their Llama counterparts, one by one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((d / "config.json").read_text())
    lc = LlamaConfig(vocab_size=126_464, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=cfg["max_sequence_length"], rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    lc.is_causal = False
    raw = raw_weights(d)
    sd = {"model.embed_tokens.weight": raw["model.transformer.wte.weight"],
          "model.norm.weight": raw["model.transformer.ln_f.weight"],
          "lm_head.weight": raw["model.transformer.ff_out.weight"]}
    for n in range(2):
        src, dst = f"model.transformer.blocks.{n}.", f"model.layers.{n}."
        sd[dst + "input_layernorm.weight"] = raw[src + "attn_norm.weight"]
        sd[dst + "self_attn.q_proj.weight"] = raw[src + "q_proj.weight"]
        sd[dst + "self_attn.k_proj.weight"] = raw[src + "k_proj.weight"]
        sd[dst + "self_attn.v_proj.weight"] = raw[src + "v_proj.weight"]
        sd[dst + "self_attn.o_proj.weight"] = raw[src + "attn_out.weight"]
        sd[dst + "post_attention_layernorm.weight"] = raw[src + "ff_norm.weight"]
        sd[dst + "mlp.gate_proj.weight"] = raw[src + "ff_proj.weight"]
        sd[dst + "mlp.up_proj.weight"] = raw[src + "up_proj.weight"]
        sd[dst + "mlp.down_proj.weight"] = raw[src + "ff_out.weight"]
    model = LlamaForCausalLM(lc)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _prompt(lm, n_extra: int = 0) -> torch.Tensor:
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 7*8?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return torch.tensor([list(ids) + [MASK] * n_extra])


# ----------------------------------------------------------------------------------------------- loading


def test_llada_download_loads_as_llama_without_shift(llada):
    assert type(llada.model).__name__ == "LlamaForCausalLM" and llada.model.config.is_causal is False
    assert llada.shift is False and llada.mask_token_id == MASK
    c = llada.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (32, 2, 4, 2, 64)
    assert c.vocab_size == 126_464 and c.rope_parameters["rope_theta"] == 5e5 and c.tie_word_embeddings is False
    tok = llada.tokenizer
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS and tok.convert_tokens_to_ids("<|mdm_mask|>") == MASK
    assert {EOS, EOT} <= set(llada.stop_ids) and MASK not in llada.stop_ids and BOS not in llada.stop_ids
    assert _prompt(llada)[0, 0].item() == BOS  # LLaDA's chat template opens with bos


def test_llada_logits_equal_the_weights_mapped_by_hand(llada, llada_dir):
    x = _prompt(llada, n_extra=6)
    with torch.no_grad():
        ours = llada.logits(x)
        ref = by_hand(llada_dir)(input_ids=x).logits
    assert ours.shape == ref.shape == (1, x.shape[1], 126_464)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert ref.abs().max().item() > 0.1  # the comparison is between real outputs, not zeros


def test_llada_attention_is_bidirectional(llada):
    x = _prompt(llada, n_extra=4)
    y = x.clone()
    y[0, -1] = 1234
    with torch.no_grad():
        a, b = llada.logits(x), llada.logits(y)
    assert (a[0, 0] - b[0, 0]).abs().max().item() > 1e-4  # the first position sees the last token


def test_llada_refuses_what_llama_does_not_compute(llada_dir, tmp_path):
    bad = tmp_path / "swiglu"
    shutil.copytree(llada_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_type": "swiglu"}))
    with pytest.raises(ValueError, match="activation_type 'swiglu'"):
        models.load(bad)
    missing = tmp_path / "missing"
    shutil.copytree(llada_dir, missing)
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    raw = raw_weights(missing)
    del raw["model.transformer.blocks.1.up_proj.weight"]
    del index["weight_map"]["model.transformer.blocks.1.up_proj.weight"]
    from safetensors.torch import save_file

    for f in missing.glob("*.safetensors"):
        f.unlink()
    save_file(raw, str(missing / "model-00001-of-00006.safetensors"), metadata={"format": "pt"})
    index["weight_map"] = {k: "model-00001-of-00006.safetensors" for k in raw}
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not hold LLaDA's parameters"):
        models.load(missing)


# ----------------------------------------------------------------------------------------------- export


def test_llada_export_round_trip(llada, llada_dir, tmp_path):
    out = tmp_path / "exported"
    assert cli(["export", str(llada_dir), "--out", str(out), "--format", "llada", "--dtype", "fp32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert {k: cfg[k] for k in TINY} == TINY and cfg["embedding_size"] == 126_464 and cfg["rope_theta"] == 5e5
    assert cfg["mask_token_id"] == MASK and cfg["eos_token_id"] == EOS and cfg["weight_tying"] is False
    assert cfg["block_type"] == "llama" and cfg["activation_type"] == "silu" and cfg["layer_norm_type"] == "rms"
    assert not {"hidden_size", "num_hidden_layers", "rope_parameters", "is_causal"} & set(cfg)
    source = json.loads((llada_dir / "config.json").read_text())
    assert set(source) - {"transformers_version"} <= set(cfg)  # every key LLaDA's own config has
    names = set(raw_weights(out))
    assert names == set(json.loads((llada_dir / "model.safetensors.index.json").read_text())["weight_map"])
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == llada.tokenizer.chat_template and "auto_map" not in tcfg
    back = models.load(out)
    assert back.shift is False and back.mask_token_id == MASK and back.stop_ids == llada.stop_ids
    x = _prompt(llada, n_extra=5)
    with torch.no_grad():
        assert (back.logits(x) - llada.logits(x)).abs().max().item() <= 1e-6


def test_llada_export_refuses_a_shifting_model(llada, tmp_path):
    from dreamtune.export import save_llada

    shifted = models.DiffusionLM(model=llada.model, tokenizer=llada.tokenizer, mask_token_id=MASK, shift=True)
    with pytest.raises(ValueError, match="does not shift"):
        save_llada(shifted, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- LLaDA's sampler


def reference_generate(lm, prompt, steps, gen_length, block_length, cfg_scale=0.0, mask_id=MASK):
    """LLaDA's generate.py at temperature 0 (remasking low_confidence), written out plainly for a model that
    does not shift: logits over the whole canvas, confidence = softmax probability of the argmax, positions
    past the block at -inf, the top-k masked positions of each row revealed."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo:lo + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        num_transfer = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
        for j in range(mask_num.size(0)):
            num_transfer[j, :(mask_num % steps)[j]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(lm.logits(torch.cat([x, un_x], dim=0)), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = lm.logits(x)
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, lo + block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


@pytest.mark.parametrize("steps,block_length,cfg_scale", [(12, 12, 0.0), (9, 4, 0.0), (6, 4, 1.5)])
def test_llada_sampler_at_temperature_0_equals_llada_reference(llada, steps, block_length, cfg_scale):
    from dreamtune.engine import generate

    prompt = _prompt(llada)
    with torch.no_grad():
        want = reference_generate(llada, prompt, steps, 12, block_length, cfg_scale)
        got = generate(llada, prompt, max_new_tokens=12, steps=steps, alg="low_confidence", block_length=block_length,
                       temperature=0.0, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.sequences, want)
    assert len(set(want[0, prompt.shape[1]:].tolist())) > 1  # a real answer, not one token repeated


@pytest.mark.parametrize("alg", ["low_confidence", "random"])
def test_llada_sampler_reveal_counts_and_block_order(llada, alg):
    from dreamtune.engine import generate

    prompt = _prompt(llada)
    p = prompt.shape[1]
    # 12 tokens in 3 blocks of 4, 9 steps: 3 per block, revealing 2, 1, 1 (4 // 3 = 1, the first 4 % 3 = 1 step one more)
    out = generate(llada, prompt, max_new_tokens=12, steps=9, alg=alg, block_length=4, temperature=0.7,
                   return_history=True, generator=torch.Generator().manual_seed(3))
    revealed = [int((h[0, p:] != MASK).sum()) for h in out.history]
    assert revealed == [2, 3, 4, 6, 7, 8, 10, 11, 12] and out.nfe == 9
    for step, h in enumerate(out.history):
        block = step // 3
        done = (h[0, p:] != MASK).tolist()
        assert all(done[:4 * block])  # earlier blocks finished
        assert not any(done[4 * (block + 1):])  # nothing after the current block
    assert torch.equal(out.sequences[:, :p], prompt)
    # more steps per block than tokens: 2 blocks of 2 over 8 steps reveal 1, 1, 0, 0 per block; empty steps run nothing
    out = generate(llada, prompt, max_new_tokens=4, steps=8, alg=alg, block_length=2, return_history=True,
                   generator=torch.Generator().manual_seed(3))
    assert [int((h[0, p:] != MASK).sum()) for h in out.history] == [1, 2, 2, 2, 3, 4, 4, 4] and out.nfe == 4


def test_llada_transfer_counts_and_gumbel_noise():
    from dreamtune.llada_sampling import gumbel_argmax, transfer_counts

    masked = torch.tensor([[True] * 7 + [False], [True] * 3 + [False] * 5, [False] * 8])
    assert transfer_counts(masked, 3).tolist() == [[3, 2, 2], [1, 1, 1], [0, 0, 0]]
    assert transfer_counts(masked, 5).tolist() == [[2, 2, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    logits = torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(0))
    got = gumbel_argmax(logits, 0.8, torch.Generator().manual_seed(7))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = (logits.double().exp() / (-torch.log(u)) ** 0.8).argmax(-1)
    assert torch.equal(got, want) and not torch.equal(got, logits.argmax(-1))
    assert torch.equal(gumbel_argmax(logits, 0.0, None), logits.argmax(-1))


class EosEverySecond(torch.nn.Module):
    """An output head that makes every second position of what it scores propose eos with near certainty."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, h):  # h [B, N, H] -> [B, N, V]
        logits = self.head(h).clone()
        logits[:, ::2, EOS] = 50.0
        return logits


def test_llada_sampler_eos_options(llada):
    from dreamtune.engine import generate

    prompt = _prompt(llada)
    p = prompt.shape[1]
    head = llada.model.lm_head
    llada.model.lm_head = EosEverySecond(head)
    try:
        kw = dict(max_new_tokens=8, steps=8, alg="low_confidence", block_length=8, return_history=True,
                  generator=torch.Generator().manual_seed(0))
        first = [h[0, p:].tolist() for h in generate(llada, prompt, **kw).history]
        assert first[0].count(EOS) == 1 and first[3].count(EOS) == 4  # eos is the most confident: revealed first
        banned = generate(llada, prompt, logits_eos_inf=True, **kw)
        assert EOS not in banned.sequences[0, p:].tolist()
        last = [h[0, p:].tolist() for h in generate(llada, prompt, confidence_eos_eot_inf=True, **kw).history]
        assert [h.count(EOS) for h in last] == [0, 0, 0, 0, 1, 2, 3, 4]  # eos waits for every other position
    finally:
        llada.model.lm_head = head


def test_llada_sampler_refuses_bad_settings(llada):
    from dreamtune.engine import generate

    prompt = _prompt(llada)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        generate(llada, prompt, max_new_tokens=10, steps=10, alg="low_confidence", block_length=4)
    with pytest.raises(ValueError, match="cannot be split over 3 blocks"):
        generate(llada, prompt, max_new_tokens=12, steps=10, alg="low_confidence", block_length=4)
    with pytest.raises(ValueError, match="top_k is not a setting of the llada sampler"):
        generate(llada, prompt, max_new_tokens=4, steps=4, alg="random", top_k=50)
    with pytest.raises(ValueError, match="cfg_scale is not a setting of the dream sampler"):
        generate(llada, prompt, max_new_tokens=4, steps=4, alg="entropy", cfg_scale=1.0)


def test_llada_generate_cli(llada_dir, capsys):
    code = cli(["generate", "--model", str(llada_dir), "What is 2+2?", "--chat", "--alg", "low_confidence",
                "--block-length", "4", "--max-new-tokens", "8", "--cfg-scale", "0.5", "--temperature", "0", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["decoding"]["sampler"] == "llada" and row["decoding"]["steps"] == 8 and row["decoding"]["cfg_scale"] == 0.5
    assert "top_k" not in row["decoding"] and "threshold" not in row["decoding"] and row["nfe"] == 8


# ----------------------------------------------------------------------------------------------- LLaDA's SFT objective


def test_llada_sft_loss_equals_llada_formula(llada):
    """forward_loss with diffusion.objective=llada against LLaDA's formula computed directly: p = (1 - 1e-3) t +
    1e-3, CE at masked positions / p, each sequence's sum / its answer length (eos padding included), mean over rows."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from dreamtune.batching import collate
    from dreamtune.config import TrainConfig
    from dreamtune.diffusion import forward_loss

    cfg = OmegaConf.structured(TrainConfig)
    cfg.diffusion.objective = "llada"
    examples = [([BOS, 11, 12, 13], [21, 22, 23, 24, 25, 26, 27, EOS]), ([BOS, 11], [31, 32, EOS]),
                ([BOS, 14, 15], [41, 42, 43, 44, EOS])]
    batch = collate(examples, max_length=16, pad_id=EOS)  # answers padded with eos: those are targets too
    answer_lengths = batch.maskable.sum(1)  # [B]
    assert answer_lengths.tolist() == [16 - 4, 16 - 2, 16 - 3]  # padded to max_length: everything after the prompt
    for seed in range(3):
        with torch.no_grad():
            loss, _, n = forward_loss(llada, batch, cfg.diffusion, torch.Generator().manual_seed(seed))
            g = torch.Generator().manual_seed(seed)  # the same draws: t per row, then u per token
            t = torch.rand(3, generator=g)
            p_mask = ((1 - 1e-3) * t + 1e-3)[:, None].expand(batch.input_ids.shape)
            masked = batch.maskable & (torch.rand(batch.input_ids.shape, generator=g) < p_mask)
            noisy = torch.where(masked, MASK, batch.input_ids)
            logits = llada.model(input_ids=noisy).logits  # LLaDA does not shift
            ce = F.cross_entropy(logits[masked], batch.input_ids[masked], reduction="none") / p_mask[masked]
            lengths = answer_lengths[:, None].expand(batch.input_ids.shape)
            direct = torch.sum(ce / lengths[masked]) / batch.input_ids.shape[0]
            dream_style = ce.sum() / masked.sum()
        assert n == int(masked.sum()) > 0
        assert abs(loss.item() - direct.item()) <= 1e-5 * direct.item()
        assert abs(dream_style.item() - direct.item()) > 1e-3  # the normalisation differs from Dream's


def test_llada_objective_refuses_other_weights():
    from dreamtune.config import load_config

    with pytest.raises(ValueError, match="diffusion.objective=llada"):
        load_config(None, ["diffusion.objective=llada", "diffusion.time_reweighting=cart", "data.train_files=a.parquet"])
    with pytest.raises(ValueError, match="choose one of dream, llada"):
        load_config(None, ["diffusion.objective=lada", "data.train_files=a.parquet"])


def test_llada_trains_3_steps_and_exports(llada_dir, tmp_path, capsys):
    from tests.conftest import addition_rows, write_parquet

    data = write_parquet(addition_rows(8), tmp_path / "train.parquet")
    run = tmp_path / "run"
    assert cli(["train", f"model.partial_pretrain={llada_dir}", f"data.train_files={data}", "data.max_length=48",
                "data.train_batch_size=2", "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3",
                "trainer.device=cpu", f"trainer.default_local_dir={run}", "trainer.logger=['console']",
                "diffusion.objective=llada", "model.dtype=fp32"]) == 0
    final = run / "checkpoint-final"
    assert cli(["export", str(final), "--out", str(tmp_path / "llada"), "--format", "llada", "--dtype", "fp32"]) == 0
    tuned, back = models.load(final, dtype="fp32"), models.load(tmp_path / "llada")  # checkpoint-final is bf16
    assert tuned.shift is False and back.shift is False and back.mask_token_id == MASK
    x = _prompt(back, n_extra=4)
    with torch.no_grad():
        assert (back.logits(x) - tuned.logits(x)).abs().max().item() <= 1e-6
        assert (back.logits(x) - models.load(llada_dir).logits(x)).abs().max().item() > 0  # training changed it


@pytest.mark.parametrize("recipe", ["llada8b_s1k.yaml", "llada8b_s1k_lora.yaml"])
def test_llada_recipes_dry_run(recipe, llada_dir, tmp_path, capsys):
    from tests.conftest import addition_rows, write_parquet

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    head = path.read_text().splitlines()[:12]
    assert any("Launch" in line for line in head) and any("GPU" in line for line in head)
    data = write_parquet(addition_rows(32), tmp_path / "train.parquet")
    code = cli(["train", "--dry-run", str(path), f"model.partial_pretrain={llada_dir}", f"data.train_files={data}",
                "data.val_files=[]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "model_type llada" in out and "objective: llada" in out
