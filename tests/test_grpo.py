"""GRPO (dreamtune/grpo.py) on CPU with tiny models: the maths against direct and brute-force computations,
what one step changes (LoRA: only adapters; the reference never), exact resume, 2 ranks = 1 rank, dry runs,
and `dreamtune eval` and the demo loading a GRPO run's checkpoint-final.

The tiny model speaks a 5-character alphabet ("0123 "), and the prompts are GSM8K-shaped rows whose
reference answer is one digit (tests/conftest.py's grpo_setup): the GSM8K grader reads the last number of a
completion, so a random model is right now and then, and groups have rewards that differ (non-zero advantages)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamtune import grpo
from dreamtune.cli import main as cli
from tests.conftest import GRPO_ALPHABET as ALPHABET
from tests.conftest import grpo_args as args
from tests.conftest import record_calls, shared_or_skip

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(grpo_setup):
    """(tiny model directory, GSM8K-shaped prompts file): conftest's grpo_setup."""
    return grpo_setup


def metrics(run_dir):
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = r  # a resumed run re-logs nothing before its checkpoint; the last entry wins
    return [by_step[s] for s in sorted(by_step)]


def dcp_model(ckpt):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(ckpt).parent / f"{Path(ckpt).name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)["model"]


# ----------------------------------------------------------------------------------------------- the maths


def test_group_advantages_match_a_direct_computation():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 0.0]
    got = grpo.group_advantages(torch.tensor(rewards), 4).tolist()
    want = []
    for k in range(0, len(rewards), 4):
        group = rewards[k:k + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)  # the sample std (n - 1)
        want += [(r - mean) / (std + grpo.ADV_EPS) for r in group]
    assert got == pytest.approx(want, abs=1e-6)
    assert got[4:8] == [0.0] * 4  # equal rewards: no signal, not 0/0


def test_completion_mask_counts_tokens_up_to_the_first_stop():
    ids = torch.tensor([[5, 6, 0, 7, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert grpo.completion_mask(ids, [0, 2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_matches_a_direct_computation(beta):
    g = torch.Generator().manual_seed(0)
    b, c, eps = 3, 5, 0.2
    logp = -torch.rand(b, c, generator=g) * 3
    old = logp + (torch.rand(b, c, generator=g) - 0.5)  # ratios well outside [0.8, 1.2] too
    ref = logp + (torch.rand(b, c, generator=g) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    loss, clip, kl = grpo.grpo_loss(logp, old, ref if beta else None, adv, mask, eps, beta)

    per_seq, per_kl, clipped, counted = [], [], 0, 0
    for i in range(b):
        terms, kls = [], []
        for j in range(c):
            if mask[i, j] == 0:
                continue
            ratio = math.exp(logp[i, j] - old[i, j])
            a = float(adv[i])
            unclipped, clipped_term = ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a
            d = float(ref[i, j] - logp[i, j])
            k3 = math.exp(d) - d - 1
            terms.append(-min(unclipped, clipped_term) + (beta * k3 if beta else 0.0))
            kls.append(k3)
            clipped += clipped_term < unclipped  # the min took the clipped side
            counted += 1
        per_seq.append(sum(terms) / len(terms))
        per_kl.append(sum(kls) / len(kls))
    assert float(loss) == pytest.approx(sum(per_seq) / b, rel=1e-5)
    assert float(clip) == pytest.approx(clipped / counted) and 0 < clipped < counted
    assert float(kl) == (pytest.approx(sum(per_kl) / b, rel=1e-5) if beta else 0.0)


@pytest.mark.parametrize("shift", [True, False])
def test_completion_logprobs_match_brute_force(shift):
    """Each row run alone, unpadded, through the plain transformers forward; the prompt masked where the same
    draw says; each completion token's log-probability by summing over the whole vocabulary by hand."""
    from dreamtune.tiny import tiny_lm

    lm = tiny_lm(alphabet=ALPHABET, hidden_size=32, layers=2, shift=shift, seed=1)
    pad, m = lm.tokenizer.pad_token_id, lm.mask_token_id
    prompts = [[7, 8, 9], [10, 6], [8, 9, 10, 6, 7]]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    pmask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    comp = torch.tensor([[7, 0, 6, 8], [9, 9, 2, 0], [10, 7, 8, 6]])
    with torch.no_grad():
        got = grpo.completion_logprobs(lm, ids, pmask, comp, 0.5, torch.Generator().manual_seed(3))
    noise = grpo.prompt_noise(pmask, 0.5, torch.Generator().manual_seed(3))
    assert not noise[pmask == 0].any() and noise.any() and not noise[pmask == 1].all()

    vocab = lm.model.config.vocab_size
    for b, p in enumerate(prompts):
        pad_n = width - len(p)
        seq = [m if noise[b, pad_n + j] else tok for j, tok in enumerate(p)] + [m] * comp.shape[1]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([seq])).logits[0].double()  # [L, V]
        for j in range(comp.shape[1]):
            at = len(p) + j
            row = logits[at - 1] if shift else logits[at]
            log_z = math.log(sum(math.exp(float(row[v])) for v in range(vocab)))
            assert float(got[b, j]) == pytest.approx(float(row[comp[b, j]]) - log_z, abs=1e-5), (b, j)
    with torch.no_grad():  # every prompt token hidden, and none: the estimate changes with the mask
        none = grpo.completion_logprobs(lm, ids, pmask, comp, 0.0, torch.Generator().manual_seed(3))
        every = grpo.completion_logprobs(lm, ids, pmask, comp, 1.0, torch.Generator().manual_seed(3))
    assert not torch.allclose(none, every)


def test_prompt_noise_per_group_shares_one_draw_per_group():
    pmask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]] * 6)
    per_row = grpo.prompt_noise(pmask, 0.5, torch.Generator().manual_seed(0))
    same = torch.rand(pmask.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(per_row, same & (pmask != 0))  # group 1: the draws d1 makes (and this code made before)
    grouped = grpo.prompt_noise(pmask, 0.5, torch.Generator().manual_seed(0), group=3)
    assert torch.equal(grouped[0], grouped[1]) and torch.equal(grouped[0], grouped[2]) and torch.equal(grouped[3], grouped[5])
    assert not torch.equal(grouped[0], grouped[3]) and not grouped[:, 0].any()


@pytest.mark.parametrize("group", [1, 4])
def test_a_token_every_rollout_shares_gets_no_gradient_only_with_a_shared_prompt_mask(group):
    """Four rollouts of one prompt, the same completion, rewards 1 0 1 0: the advantages sum to 0, so with one
    prompt mask for the group the policy gradient is exactly 0; with one mask per rollout (d1's) each row's
    log-probability sees another prompt and the terms do not cancel: noise that carries no reward signal."""
    from dreamtune.tiny import tiny_lm

    lm = tiny_lm(alphabet=ALPHABET, hidden_size=32, layers=2, seed=1)
    ids = torch.tensor([[7, 8, 9, 10, 6, 7, 8, 9]] * 4)
    pmask = torch.ones_like(ids)
    comp = torch.tensor([[7, 9, 6, 0]] * 4)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    logp = grpo.completion_logprobs(lm, ids, pmask, comp, 0.5, torch.Generator().manual_seed(2), group=group)
    loss, _, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, grpo.completion_mask(comp, lm.stop_ids), 0.2, 0.0)
    loss.backward()
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in lm.model.parameters() if p.grad is not None]))
    assert (norm < 1e-6) if group == 4 else (norm > 1e-3), norm


# ----------------------------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("lora", [True, False])
def test_one_step_changes_only_what_it_should(setup, tmp_path, monkeypatch, lora):
    """LoRA: only the adapted linear layers change (merged into the export), and the reference (the base with
    the adapters off) gives the base model's logits after the step. Full: the policy changes, the frozen
    reference copy does not."""
    from safetensors.torch import load_file

    import dreamtune

    made = record_calls(monkeypatch, grpo, "make_reference")
    run = tmp_path / "run"
    extra = ["model.lora_rank=4", "model.lora_alpha=8"] if lora else []
    assert cli(["train", *args(setup, run, "trainer.total_training_steps=1", *extra)]) == 0
    row = metrics(run)[0]
    assert row["reward_std"] > 0 and row["kl"] >= 0 and 0 <= row["clip_fraction"] <= 1  # a real signal
    before = load_file(setup[0] / "model.safetensors")
    after = load_file(run / "checkpoint-final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k].to(torch.bfloat16), after[k])}
    ref = made[0]
    if lora:
        assert changed and all(k.endswith("proj.weight") for k in changed), changed
        base = dreamtune.load(setup[0])
        x = torch.tensor([[7, 8, 4, 4, 4]])
        with torch.no_grad(), ref.off():
            got = ref.lm.logits(x)
        assert torch.allclose(got, base.logits(x), atol=1e-6)
    else:
        assert "lm_head.weight" in changed and len(changed) > len(before) // 2
        assert all(torch.equal(v, before[k]) for k, v in ref.lm.model.state_dict().items())


def test_prompt_mask_per_group_reaches_the_updates(setup, tmp_path):
    """grpo.prompt_mask_per_group: the same rollouts (the same seed), other prompt masks in the old, reference
    and new log-probabilities, so another loss and gradient."""
    extra = ["trainer.total_training_steps=1", "grpo.p_mask_prompt=0.5"]
    assert cli(["train", *args(setup, tmp_path / "row", *extra)]) == 0
    assert cli(["train", *args(setup, tmp_path / "group", *extra, "grpo.prompt_mask_per_group=true")]) == 0
    a, b = metrics(tmp_path / "row")[0], metrics(tmp_path / "group")[0]
    assert a["reward_mean"] == b["reward_mean"] and a["completion_length"] == b["completion_length"]
    assert a["loss"] != b["loss"] and a["grad_norm"] != b["grad_norm"]


def test_stop_and_resume_equals_an_unbroken_run(setup, tmp_path):
    extra = ["trainer.total_training_steps=3", "trainer.save_checkpoint_steps=1"]
    assert cli(["train", *args(setup, tmp_path / "whole", *extra)]) == 0
    parts = args(setup, tmp_path / "parts", *extra)
    assert cli(["train", *parts, "trainer.max_steps_this_run=1"]) == 0
    assert not (tmp_path / "parts" / "checkpoint-final").exists()
    assert cli(["train", *parts, "trainer.resume_training=true"]) == 0
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward_mean", "accuracy", "completion_length", "loss", "kl", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bitwise
    wa, wb = dcp_model(tmp_path / "whole" / "checkpoint-3"), dcp_model(tmp_path / "parts" / "checkpoint-3")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.distributed
def test_two_ranks_match_one(setup, tmp_path):
    """Global batch 4 prompts: one process with 2 micro-batches vs two FSDP2 ranks (gloo) with one each."""
    extra = ["trainer.total_training_steps=3", "model.lora_rank=4"]
    assert cli(["train", *args(setup, tmp_path / "one", *extra)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dreamtune.grpo",
           *args(setup, tmp_path / "two", *extra)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):  # fp32; only the order of the reductions differs
        for key in ("reward_mean", "accuracy", "completion_length", "loss", "kl", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


def test_eval_and_demo_load_the_grpo_checkpoint(grpo_run, setup, tmp_path, capsys):
    """checkpoint-final of a GRPO run is an export like SFT's: `dreamtune eval` grades it (its prompts as a
    GSM8K benchmark file) and the demo's loader streams an answer from it; both hold the trained weights, not
    the base's."""
    import shutil

    from dreamtune import demo
    from dreamtune.engine import load_for_generation

    ckpt = grpo_run / "checkpoint-final"
    data = tmp_path / "eval_data"
    (data / "gsm8k").mkdir(parents=True)
    shutil.copyfile(setup[1], data / "gsm8k" / "test.jsonl")
    out = tmp_path / "eval_results.json"
    assert cli(["eval", "--model", str(ckpt), "--tasks", "gsm8k", "--data-dir", str(data), "--limit", "4",
                "--prompt-format", "chat", "--max-new-tokens", "8", "--steps", "4", "--grade-workers", "0",
                "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["model"] == str(ckpt.resolve()) and summary["tasks"]["gsm8k"]["total"] == 4
    capsys.readouterr()

    lm = demo.load_model(str(ckpt))
    answer, status = list(demo.denoise_stream(lm, "1 2", steps=4, max_new_tokens=8))[-1]
    assert status.startswith("done: 4 forward passes") and "░" not in answer
    tuned, evals = lm.model.state_dict(), load_for_generation(str(ckpt)).model.state_dict()  # eval's run_shard loader
    base = load_for_generation(str(setup[0])).model.state_dict()
    assert tuned.keys() == evals.keys() == base.keys() and all(torch.equal(tuned[k], evals[k]) for k in tuned)
    # the export is bf16: a weight the run left alone is the base's rounded to bf16
    changed = [k for k in tuned if not torch.equal(tuned[k], base[k].to(torch.bfloat16).to(tuned[k].dtype))]
    assert "lm_head.weight" in changed


# ----------------------------------------------------------------------------------------------- recipes and errors


@pytest.mark.parametrize("recipe", ["configs/dream7b_gsm8k_grpo.yaml", "configs/llada8b_gsm8k_grpo.yaml"])
def test_dry_run_validates_the_grpo_recipes(setup, recipe, capsys):
    train_file = shared_or_skip("eval", "gsm8k", "train.jsonl")
    code = cli(["train", "--dry-run", str(REPO / recipe), f"model.partial_pretrain={setup[0]}",
                f"grpo.prompts_file={train_file}"])
    out = capsys.readouterr().out
    assert code == 0 and "stage: grpo" in out and "# plan: rows=7473" in out and "# grpo: gsm8k prompts" in out


@pytest.mark.parametrize("override, fragment", [
    ("grpo.num_generations=1", "'grpo.num_generations': 1"),
    ("grpo.temperature=0", "grpo.temperature=0"),
    ("grpo.alg=greedy", "'grpo.alg': 'greedy'"),
    ("grpo.task=arithmetic", "grpo.prompt_format=sft"),
    ("grpo.prompts_file=nope.jsonl", "nope.jsonl"),
])
def test_bad_grpo_settings_fail_in_one_line(setup, tmp_path, override, fragment, capsys):
    run = tmp_path / "run"
    a = [x for x in args(setup, run) if not x.startswith("grpo.prompt_format")] if "arithmetic" in override else args(setup, run)
    assert cli(["train", *a, override, "grpo.prompt_format=chat" if "arithmetic" in override else "trainer.seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and fragment in err[-1], err[-1]
    assert not run.exists()
