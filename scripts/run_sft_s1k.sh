#!/bin/bash
# The s1K-1.1 SFT launch of Dream's trainer, run by dreamtune. Changed from Dream's launch line: the module
# (src.trainer.fsdp_sft_trainer -> dreamtune.train), and no `cd` into a Dream checkout, so data paths are
# relative to where you run it. Every override is Dream's key=value form, as written for Dream's trainer.
#   bash scripts/run_sft_s1k.sh <nproc_per_node> <save_path> [key=value ...]
# MODEL_PATH and DATA_DIR may be set in the environment; extra key=value arguments override anything.
set -x

nproc_per_node=${1:-1}
save_path=${2:-checkpoints/s1k-sft}
shift $(( $# < 2 ? $# : 2 ))
MODEL_PATH=${MODEL_PATH:-Dream-org/Dream-v0-Base-7B}
DATA_DIR=${DATA_DIR:-data/s1k_dream_format}

torchrun --standalone --nnodes=1 --nproc_per_node=$nproc_per_node \
    -m dreamtune.train \
    diffusion.time_reweighting=cart \
    data.train_files=$DATA_DIR/train.parquet \
    data.val_files=$DATA_DIR/val.parquet \
    data.max_length=2048 \
    data.prompt_key=prompt \
    data.response_key=response \
    data.truncation=right \
    optim.lr=2e-6 \
    data.micro_batch_size_per_gpu=2 \
    data.enable_perbatch_cutoff=True \
    data.perbatch_cutoff_type=random_with_input_pad \
    model.partial_pretrain=$MODEL_PATH \
    model.trust_remote_code=True \
    model.enable_gradient_checkpointing=True \
    trainer.default_local_dir=$save_path \
    trainer.project_name=dream-s1k-sft \
    trainer.experiment_name=exp-$(date +%Y%m%d-%H%M) \
    trainer.logger=['console','wandb'] \
    trainer.total_epochs=3 \
    trainer.save_freq=500 \
    "$@"
