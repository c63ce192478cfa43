"""The trainer end to end on CPU: it learns, LoRA trains only adapters, exact resume after a kill,
scripts/run_sft_s1k.sh under torchrun (FSDP2 on gloo), equality of 2-process and 1-process runs, and clean failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamtune.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def base_args(model_dir, data_dir, run_dir, *extra):
    return [f"model.partial_pretrain={model_dir}", f"data.train_files={data_dir / 'train.parquet'}",
            f"data.val_files={data_dir / 'val.parquet'}", "data.max_length=40", "data.train_batch_size=8",
            "data.micro_batch_size_per_gpu=4", "optim.lr=3e-3", "optim.warmup_steps_ratio=0.05",
            f"trainer.default_local_dir={run_dir}", "trainer.logger=['console','tensorboard']", "trainer.device=cpu",
            "trainer.val_check_steps=10", *extra]


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:  # a resumed run re-logs the steps after its checkpoint: the last entry wins
        if "loss" in r:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def dcp_load(ckpt):
    """Everything a resumable checkpoint stores: {"model": fp32 weights, "optim": optimizer state}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(ckpt).parent / f"{Path(ckpt).name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)


def dcp_state(ckpt):
    """The fp32 model weights stored in a resumable checkpoint."""
    return dcp_load(ckpt)["model"]


def test_tiny_run_learns_and_writes_everything(tiny_model_dir, sft_data, tmp_path):
    from safetensors.torch import load_file

    import dreamtune

    run = tmp_path / "run"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, "trainer.total_epochs=15")]) == 0
    m = metrics(run)
    first, last = sum(r["loss"] for r in m[:5]) / 5, sum(r["loss"] for r in m[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    vals = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert vals[-1] < vals[0]
    for name in ["train.log", "config.yaml", "metrics.jsonl", "checkpoint-final/config.json", "latest"]:
        assert (run / name).exists(), name
    assert "step 90/90" in (run / "train.log").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # every parameter changed, and the export is bf16 and loads
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "checkpoint-final" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    unchanged = [k for k in before if torch.equal(before[k].to(torch.bfloat16), after[k])]
    assert not unchanged, unchanged
    lm = dreamtune.load(run / "checkpoint-final")
    assert lm.shift and lm.mask_token_id == 4


def test_lora_trains_only_adapters(tiny_model_dir, sft_data, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run, "trainer.total_epochs=2", "model.lora_rank=4",
                                     "model.lora_alpha=8", "trainer.save_checkpoint_steps=5",
                                     "trainer.export_dream=true", "model.offload_embeddings=true")]) == 0
    dream = json.loads((run / "checkpoint-final-dream" / "config.json").read_text())
    assert dream["model_type"] == "Dream" and dream["architectures"] == ["DreamModel"]
    state = dcp_state(run / "checkpoint-12")
    assert state and all("lora_" in k for k in state), list(state)[:5]  # only adapters are stored
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "checkpoint-final" / "model.safetensors")
    assert set(after) == set(before)  # merged back into plain HF names
    changed = {k for k in before if not torch.equal(before[k].to(torch.bfloat16), after[k])}
    assert changed and all(k.endswith(("proj.weight",)) for k in changed), changed  # linear layers only
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed


def test_offloaded_embeddings_give_the_same_forward():
    """offload_input_embeddings keeps keys and outputs; it refuses a trained or a tied table."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dreamtune.distributed import offload_input_embeddings

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    model = get_peft_model(Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=False)),
                           LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(64, (2, 9))
    keys, ref = list(model.state_dict()), model(input_ids=ids).logits
    offload_input_embeddings(model)
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "cpu" and emb._forward_pre_hooks and emb._forward_hooks  # hooks in place
    assert list(model.state_dict()) == keys and torch.equal(model(input_ids=ids).logits, ref)

    with pytest.raises(ValueError, match="frozen"):
        offload_input_embeddings(Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=False)))
    tied = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=True)).requires_grad_(False)
    with pytest.raises(ValueError, match="ties"):
        offload_input_embeddings(tied)


def test_exact_resume_after_kill(tiny_model_dir, sft_data, tmp_path):
    args = ["data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=160",
            "trainer.save_checkpoint_steps=4", "trainer.keep_last=1", "trainer.val_check_steps=0",
            "diffusion.time_reweighting=cart", "data.perbatch_cutoff=true", "data.perbatch_cutoff_type=random_with_input_pad"]
    cmd = [sys.executable, "-m", "dreamtune.train"]
    full = tmp_path / "full"
    subprocess.run(cmd + base_args(tiny_model_dir, sft_data, full, *args), check=True, env=ENV, capture_output=True)

    cut = tmp_path / "cut"
    p = subprocess.Popen(cmd + base_args(tiny_model_dir, sft_data, cut, *args), env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "latest").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "checkpoint-final").exists(), "the run finished before it could be killed"
    killed_at = int((cut / "latest").read_text().split("-")[1])
    assert killed_at < 160
    subprocess.run(cmd + base_args(tiny_model_dir, sft_data, cut, *args, "trainer.resume_training=true"),
                   check=True, env=ENV, capture_output=True)

    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 161))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa, wb = dcp_state(full / "checkpoint-160"), dcp_state(cut / "checkpoint-160")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_stop_and_resume_is_exact(tiny_model_dir, sft_data, tmp_path, *extra):
    """Train 6 steps unbroken ('whole'), and 3 + resume + 3 ('parts'): the losses must match bitwise."""
    extra = [*extra, "trainer.total_training_steps=6", "trainer.val_check_steps=0", "trainer.save_checkpoint_steps=3"]
    assert cli(["train", *base_args(tiny_model_dir, sft_data, tmp_path / "whole", *extra)]) == 0
    parts = base_args(tiny_model_dir, sft_data, tmp_path / "parts", *extra)
    assert cli(["train", *parts, "trainer.max_steps_this_run=3"]) == 0
    assert cli(["train", *parts, "trainer.resume_training=true"]) == 0
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise


def test_bf16_moments_resume_exactly(tiny_model_dir, sft_data, tmp_path):
    """optim.state_dtype=bfloat16: stop after 3 of 6 steps, resume; the losses match a run that never
    stopped, and the checkpoint holds the moments in bf16 (torch's load_state_dict would make them fp32)."""
    assert_stop_and_resume_is_exact(tiny_model_dir, sft_data, tmp_path, "optim.state_dtype=bfloat16")
    state = dcp_load(tmp_path / "parts" / "checkpoint-3")["optim"]["state"]
    moments = [v for st in state.values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


@pytest.mark.parametrize("extra", ["model.offload_embeddings=false", "model.offload_embeddings=true",
                                   "model.lora_dropout=0.1"])
def test_lora_resume_continues_exactly(tiny_model_dir, sft_data, tmp_path, extra):
    """LoRA (only adapters in the checkpoint): stop after 3 of 6 steps, resume; the losses match a run that
    never stopped (with and without the input embeddings in CPU memory, and with dropout)."""
    assert_stop_and_resume_is_exact(tiny_model_dir, sft_data, tmp_path, "model.lora_rank=4", "model.lora_alpha=8", extra)


def test_resume_with_other_settings_is_one_error_and_keeps_config(tiny_model_dir, sft_data, tmp_path, capsys):
    """Resuming a rank-4 LoRA checkpoint as rank 8, or as a full fine-tune: one error line, exit 2, and the
    run's config.yaml still describes the run that wrote the checkpoint."""
    args = base_args(tiny_model_dir, sft_data, tmp_path / "run", "model.lora_rank=4", "trainer.total_training_steps=2",
                     "trainer.val_check_steps=0", "trainer.save_checkpoint_steps=2")
    assert cli(["train", *args]) == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    for other in ["model.lora_rank=8", "model.lora_rank=0"]:
        assert cli(["train", *args, other, "trainer.resume_training=true", "trainer.total_training_steps=4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and "settings it was trained with" in err[-1], err[-3:]
        assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert cli(["train", *args, f"trainer.resume_path={tmp_path}"]) == 2
    assert "not a complete dreamtune checkpoint" in capsys.readouterr().err


def _torchrun(nproc, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dreamtune.train", *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_two_processes_match_one(model_dir, data_dir, tmp_path, extra, *, steps):
    """The same run under torchrun with 1 and 2 processes: the same number of logged steps, and per step the
    same loss and grad norm (fp32 on CPU; only the order of the reductions differs)."""
    _torchrun(1, base_args(model_dir, data_dir, tmp_path / "one", *extra), tmp_path)
    _torchrun(2, base_args(model_dir, data_dir, tmp_path / "two", *extra), tmp_path)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == steps
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5, abs=1e-6)


@pytest.mark.distributed
def test_fsdp_two_processes_match_one(tiny_model_dir, sft_data, tmp_path):
    """Global batch 8: one process with 2 accumulation steps of 4 vs two FSDP2 ranks with one of 4 each."""
    extra = ["trainer.total_training_steps=6", "trainer.val_check_steps=3", "trainer.save_checkpoint_steps=100"]
    assert_two_processes_match_one(tiny_model_dir, sft_data, tmp_path, extra, steps=6)


@pytest.mark.distributed
def test_plan_script_runs_as_written(tiny_model_dir, sft_data, tmp_path):
    """`bash scripts/run_sft_s1k.sh 2 checkpoints/exp1`, model and data pointed at local files."""
    import dreamtune

    env = {**ENV, "MODEL_PATH": str(tiny_model_dir), "DATA_DIR": str(sft_data), "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "run_sft_s1k.sh"), "2", "checkpoints/exp1"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "checkpoints" / "exp1"
    assert (run / "train.log").exists() and (run / "metrics.jsonl").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    cfg = (run / "config.yaml").read_text()
    assert "perbatch_cutoff: true" in cfg and "save_checkpoint_steps: 500" in cfg
    lm = dreamtune.load(run / "checkpoint-final")
    assert lm.model.config.is_causal is False


@pytest.mark.parametrize("override, fragment", [
    ("data.max_lenght=5", "data.max_length"),
    ("data.truncation=sideways", "data.truncation"),
    ("data.train_files=/nope/train.parquet", "/nope/train.parquet"),
    ("model.partial_pretrain=NOTAMODEL", "no config.json"),
    ("model.fsdp_config.cpu_offload=true", "torchrun --nproc_per_node=1"),
    ("optim.state_dtype=bf16", "'optim.state_dtype': 'bf16' (choose one of float32, bfloat16)"),
    ("optim.state_dtype=fp8", "'optim.state_dtype': 'fp8' (choose one of float32, bfloat16)"),
    ("optim.state_dtype=bfloat16 optim.betas=[0.9,0.999]", "cannot decay"),
    ("data.micro_batch_tokens=20", "at least data.max_length=40"),
    ("data.micro_batch_tokens=400", "leave data.micro_batch_size_per_gpu at 1"),
    ("trainer.peak_tflops=0", "trainer.peak_tflops"),
])
def test_bad_input_fails_cleanly(tiny_model_dir, sft_data, tmp_path, override, fragment, capsys):
    if override.startswith("model.partial_pretrain"):
        (tmp_path / "NOTAMODEL").mkdir()
        override = f"model.partial_pretrain={tmp_path / 'NOTAMODEL'}"
    run = tmp_path / "run"
    assert cli(["train", *base_args(tiny_model_dir, sft_data, run), *override.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and fragment in err[-1]
    assert not run.exists()  # no half-made run directory


@pytest.mark.parametrize("blocked", ["read_only", "a_file"])
def test_an_unwritable_run_directory_fails_before_the_model_loads(tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys,
                                                                   blocked):
    """trainer.default_local_dir on a read-only disk (simulated: as root, chmod does not stop writes) or under a
    file is one line naming it, before the model is loaded, and nothing is written."""
    import dreamtune.atomic as A
    import dreamtune.models as M
    from conftest import record_calls

    if blocked == "read_only":
        (tmp_path / "ro").mkdir()
        real = A.os.access
        monkeypatch.setattr(A.os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
        run, reason = tmp_path / "ro" / "run", f"{tmp_path / 'ro'} is not writable; choose another path"
    else:
        (tmp_path / "afile").write_text("mine")
        run, reason = tmp_path / "afile" / "run", f"{tmp_path / 'afile'} is a file, not a directory; choose another path"
    loads = record_calls(monkeypatch, M, "load")
    for dry in ([], ["--dry-run"]):
        capsys.readouterr()
        assert cli(["train", *dry, *base_args(tiny_model_dir, sft_data, run)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: trainer.default_local_dir={run}: cannot write ") and line.endswith(reason), line
    assert loads == [] and not run.exists()


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys):
    import dreamtune.train as T

    real = T.forward_loss
    calls = {"n": 0}

    def poisoned(lm, batch, cfg, generator):
        loss, ce, n = real(lm, batch, cfg, generator)
        calls["n"] += 1
        if calls["n"] > 6:  # 2 micro-batches per step: steps 1-3 are fine, step 4 is not
            loss = loss * float("nan")
        return loss, ce, n

    monkeypatch.setattr(T, "forward_loss", poisoned)
    run = tmp_path / "run"
    code = cli(["train", *base_args(tiny_model_dir, sft_data, run, "trainer.total_training_steps=10",
                                     "trainer.save_checkpoint_steps=2", "trainer.val_check_steps=0")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "at step 4" in err[-1] and "last good checkpoint" in err[-1]
    assert (run / "latest").read_text() == "checkpoint-2" and not (run / "checkpoint-final").exists()


def test_oom_message_gives_the_plan_and_the_remedies():
    from omegaconf import OmegaConf

    from dreamtune.config import TrainConfig
    from dreamtune.distributed import Dist
    from dreamtune.training import oom_message

    cfg = OmegaConf.structured(TrainConfig)
    msg = oom_message(cfg, {"micro_batch": 2}, Dist(world=1), 7_615_616_512)
    assert "7.62B parameters" in msg and "113 GiB" in msg
    for remedy in ["micro_batch_size_per_gpu=1", "enable_gradient_checkpointing=True", "max_length=1024",
                   "optim.state_dtype=bfloat16", "lora_rank=16", "cpu_offload=True"]:
        assert remedy in msg
    cfg.optim.state_dtype = "bfloat16"  # already on: the message counts 12 bytes per parameter, not 16
    msg = oom_message(cfg, {"micro_batch": 2}, Dist(world=1), 7_615_616_512)
    assert "85 GiB" in msg and "state_dtype" not in msg


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["optim.state_dtype=float32", "optim.state_dtype=bfloat16", "model.lora_rank=4",
                                     "trainer.async_save=true"])
def test_fsdp_resume_continues_exactly(tiny_model_dir, sft_data, tmp_path, setting):
    """Two FSDP2 ranks: stop after 3 of 6 steps (sharded DCP checkpoint), resume; the losses match a run
    that never stopped. Also with AdamW moments in bf16 (dreamtune.optim on sharded DTensor parameters),
    with LoRA (sharded adapters only in the checkpoint) and with background saves (DCP async_save)."""
    extra = ["trainer.total_training_steps=6", "trainer.val_check_steps=0", "trainer.save_checkpoint_steps=3",
             setting]
    _torchrun(2, base_args(tiny_model_dir, sft_data, tmp_path / "whole", *extra), tmp_path)
    _torchrun(2, base_args(tiny_model_dir, sft_data, tmp_path / "parts", *extra, "trainer.max_steps_this_run=3"), tmp_path)
    assert (tmp_path / "parts" / "latest").read_text() == "checkpoint-3"
    assert not (tmp_path / "parts" / "checkpoint-final").exists()
    _torchrun(2, base_args(tiny_model_dir, sft_data, tmp_path / "parts", *extra, "trainer.resume_training=true"), tmp_path)
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
