"""Config: defaults, YAML recipes, aliases of keys that Dream launch lines write, list values, strict errors, `train --dry-run`."""

from pathlib import Path

import pytest

from dreamtune.cli import main as cli
from dreamtune.config import load_config, valid_keys

REPO = Path(__file__).resolve().parents[1]
# The override list of scripts/run_sft_s1k.sh (Dream's keys, as written for Dream's trainer), verbatim but for paths.
LAUNCH = [
    "diffusion.time_reweighting=cart", "data.max_length=2048", "data.prompt_key=prompt",
    "data.response_key=response", "data.truncation=right", "optim.lr=2e-6", "data.micro_batch_size_per_gpu=2",
    "data.enable_perbatch_cutoff=True", "data.perbatch_cutoff_type=random_with_input_pad",
    "model.trust_remote_code=True", "model.enable_gradient_checkpointing=True",
    "trainer.project_name=dream-s1k-sft", "trainer.experiment_name=exp-20261129-0610",
    "trainer.logger=['console','wandb']", "trainer.total_epochs=3", "trainer.save_freq=500",
]


def test_upstream_keys_exist():
    keys = valid_keys()
    for k in ["data.train_files", "data.val_files", "data.prompt_key", "data.response_key", "data.max_length",
              "data.truncation", "data.train_batch_size", "data.micro_batch_size_per_gpu", "data.perbatch_cutoff",
              "data.perbatch_cutoff_type", "data.resp_cutoff_ratio", "data.tokenized", "data.pad_token_id",
              "model.partial_pretrain", "model.trust_remote_code", "model.enable_gradient_checkpointing",
              "model.lora_rank", "model.lora_alpha", "model.target_modules", "model.fsdp_config.cpu_offload",
              "model.fsdp_config.offload_params", "optim.lr", "optim.betas", "optim.weight_decay",
              "optim.warmup_steps_ratio", "optim.clip_grad", "diffusion.time_reweighting", "diffusion.cart_p",
              "diffusion.token_reweighting", "diffusion.alpha", "diffusion.gamma", "trainer.default_local_dir",
              "trainer.default_hdfs_dir", "trainer.resume_path", "trainer.resume_training", "trainer.project_name",
              "trainer.experiment_name", "trainer.total_epochs", "trainer.total_training_steps", "trainer.logger",
              "trainer.seed", "trainer.save_checkpoint_steps"]:
        assert k in keys, k


def test_defaults_suit_s1k():
    cfg = load_config()
    assert cfg.data.train_batch_size == 16 and cfg.optim.lr == 1e-5
    assert cfg.optim.warmup_steps_ratio == 0.1 and cfg.optim.lr_scheduler == "cosine"
    assert list(cfg.optim.betas) == [0.9, 0.95]


def test_launch_script_overrides_and_aliases():
    cfg = load_config(None, LAUNCH + ["+data.perbatch_cutoff=True", "data.train_files=a.parquet"])
    assert cfg.data.perbatch_cutoff is True
    assert cfg.trainer.save_checkpoint_steps == 500
    assert list(cfg.trainer.logger) == ["console", "wandb"]
    assert cfg.optim.lr == pytest.approx(2e-6)
    assert list(cfg.data.train_files) == ["a.parquet"]  # a scalar for a list key becomes a one-item list


def test_yaml_recipes_load():
    for p in sorted((REPO / "configs").glob("*.yaml")):
        load_config(p)


@pytest.mark.parametrize("override, fragment", [
    ("data.max_lenght=5", "data.max_length"),
    ("optim.lr=abc", "optim.lr"),
    ("data.truncation=rigth", "right"),
    ("trainer.logger=['console','tensorbord']", "trainer.logger"),
    ("diffusion.time_reweighting=kart", "cart"),
    ("lr=1e-5", "optim.lr"),
    ("data.train_batch_size=0", "data.train_batch_size"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("no_equals_sign", "key=value"),
    ("model.offload_embeddings=true", "model.lora_rank"),
])
def test_bad_overrides_name_the_key(override, fragment, capsys):
    assert cli(["train", "--dry-run", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0]


def test_dry_run_plan(tiny_model_dir, sft_data, capsys):
    code = cli(["train", "--dry-run", *LAUNCH, f"model.partial_pretrain={tiny_model_dir}",
                f"data.train_files={sft_data / 'train.parquet'}", f"data.val_files={sft_data / 'val.parquet'}",
                "data.train_batch_size=8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "perbatch_cutoff: true" in out and "save_checkpoint_steps: 500" in out
    # 48 rows / global batch 8 = 6 steps per epoch, 3 epochs
    assert "steps_per_epoch=6" in out and "total_steps=18" in out and "grad_accum=4" in out
    assert "warning: only 18 optimizer steps" in out


@pytest.mark.parametrize("damage, fragment", [
    ("dir", "config file 'PATH' is a directory; pass a YAML file"),
    ("bytes", "PATH is not UTF-8 text, so not YAML; pass a YAML recipe"),
])
def test_an_unreadable_recipe_is_one_line_naming_it(tmp_path, capsys, damage, fragment):
    path = tmp_path / "recipe.yaml"
    if damage == "dir":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfeoptim:\n  lr: 1e-5\n")
    assert cli(["train", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and fragment.replace("PATH", str(path)) in err, err


def test_dry_run_missing_data(capsys):
    assert cli(["train", "--dry-run", "data.train_files=/nonexistent/train.parquet"]) == 2
    assert "/nonexistent/train.parquet" in capsys.readouterr().err
