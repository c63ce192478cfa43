"""Writing models: an HF directory (`save_hf`), Dream's format (`save_dream`) and LLaDA's (`save_llada`, with
the key and name mapping of dreamtune.llada).

    from dreamtune.export import save_dream, save_hf
    save_hf(lm, "out/hf")          # dreamtune, AutoModelForCausalLM and transformers 4.46 read it alike
    save_dream(lm, "out/dream")    # model_type "Dream", Dream's config keys; Dream's own code reads it

`dreamtune export` (dreamtune/export_cli.py) and the trainer's checkpoint-final write through these.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dreamtune.atomic import io_error, replace_dir, temp_dir_beside
from dreamtune.models import _DREAM_TO_QWEN2_KEYS, META_FILE, DiffusionLM
from dreamtune.tokenizer import check_tokenizer, save_tokenizer


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (FSDP2 keeps the module itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def legacy_rope(config) -> dict:
    """`rope_theta` and `rope_scaling` as transformers 4.x reads them (it ignores transformers 5's
    `rope_parameters` and would fall back to rope_theta 10000)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {"rope_theta": theta, "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope}


def special_ids(lm: DiffusionLM) -> dict:
    """bos/eos/pad/mask ids as the model's config has them (the source's, unless training changed them),
    the tokenizer's where the config has none."""
    c, tok = unwrap(lm.model).config, lm.tokenizer
    ids = {k: getattr(c, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tok is not None:
        for k in ids:
            ids[k] = ids[k] if ids[k] is not None else getattr(tok, k)
    return {**ids, "mask_token_id": lm.mask_token_id}


def save_hf(lm: DiffusionLM, out, dtype=torch.bfloat16, state_dict: dict | None = None) -> Path:
    """Write an HF directory (safetensors in `dtype`, config with is_causal false, tokenizer, dreamtune.json)
    that dreamtune, transformers 5 and transformers 4.46 read alike (rope_theta beside rope_parameters, the
    chat template in tokenizer_config.json). The source's generation_config.json is kept.

    state_dict: plain HF keys (e.g. gathered from an FSDP model, LoRA merged); default: the model's own.
    The weights are written through a skeleton on the meta device, so no second copy is allocated."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    config = unwrap(lm.model).config
    config.is_causal = False
    ids = special_ids(lm)
    if lm.tokenizer is not None:  # never write a worse directory than the source
        check_tokenizer(lm.tokenizer, lm.source_dir or Path(lm.source or "."), ids)
    sd = state_dict if state_dict is not None else unwrap(lm.model).state_dict()
    sd = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    tmp = temp_dir_beside(out)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        skeleton.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.update(ids, dtype=str(dtype).replace("torch.", ""), is_causal=False, **legacy_rope(config))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        source_gen = lm.source_dir / "generation_config.json" if lm.source_dir is not None else None
        if source_gen is not None and source_gen.is_file():
            shutil.copyfile(source_gen, tmp / "generation_config.json")
        if lm.tokenizer is not None:
            save_tokenizer(lm.tokenizer, tmp, source=lm.source_dir)
        (tmp / META_FILE).write_text(json.dumps({"mask_token_id": lm.mask_token_id, "shift": lm.shift}, indent=2))
        replace_dir(tmp, out)
    except Exception as e:  # a full disk, in the OS's words or the safetensors writer's: named as `out`
        error = io_error(e, out, tmp)
        if error is None:
            raise
        raise error from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_dream(lm: DiffusionLM, out, dtype=torch.bfloat16, state_dict: dict | None = None) -> Path:
    """Write a Dream-format directory: config.json with model_type "Dream", architectures ["DreamModel"] and
    Dream's keys; weights under the same names (Dream's modules are named as Qwen2's). Dream's remote code
    (configuration_dream.py, modeling_dream.py from the Dream-org hub repo) can be dropped beside it; the
    config's auto_map already points at those files. The tokenizer is written as Qwen2Tokenizer files
    (what Dream's remote DreamTokenizer reads), with no auto_map."""
    if not lm.shift:
        raise ValueError("a Dream-format export needs a shifting model (Dream scores position i from output i-1); this model does not shift")
    c = unwrap(lm.model).config
    if c.model_type != "qwen2":
        raise ValueError(f"a Dream-format export needs a Qwen2-architecture model; this one is {c.model_type}; use save_hf instead")
    out = save_hf(lm, out, dtype=dtype, state_dict=state_dict)
    dream_cfg = {k: getattr(c, k) for k in _DREAM_TO_QWEN2_KEYS if k not in ("rope_theta", "rope_scaling") and hasattr(c, k)}
    dream_cfg.update(legacy_rope(c))
    dream_cfg.update(
        special_ids(lm),
        model_type="Dream",
        architectures=["DreamModel"],
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        torch_dtype=str(dtype).replace("torch.", ""),
        use_cache=False,
    )
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(dream_cfg, indent=2))
    os.replace(tmp, out / "config.json")
    return out


def save_llada(lm, out, dtype=torch.bfloat16, state_dict: dict | None = None) -> Path:
    """Write a LLaDA-format directory: config.json with LLaDA's keys (model_type "llada"), safetensors shards
    under LLaDA's parameter names with their index, the tokenizer (readable by transformers 4.46) and
    generation_config.json. state_dict: plain HF keys (default: the model's own)."""
    from huggingface_hub import save_torch_state_dict

    from dreamtune.llada import llada_config, llada_state_dict

    if lm.shift:
        raise ValueError("a LLaDA-format export needs a model that does not shift (LLaDA scores position i from output i); "
                         "this one shifts as Dream does; export it with --format hf or --format dream")
    out = Path(out)
    config = unwrap(lm.model).config
    ids = special_ids(lm)
    cfg = llada_config(config, ids, dtype)  # refuses what LLaDA cannot express before anything is written
    if lm.tokenizer is not None:
        check_tokenizer(lm.tokenizer, lm.source_dir or Path(lm.source or "."), ids)
    sd = state_dict if state_dict is not None else unwrap(lm.model).state_dict()
    sd = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    sd = llada_state_dict(sd, bool(config.tie_word_embeddings))
    tmp = temp_dir_beside(out)
    try:
        save_torch_state_dict(sd, str(tmp), max_shard_size="5GB")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        source_gen = lm.source_dir / "generation_config.json" if lm.source_dir is not None else None
        if source_gen is not None and source_gen.is_file():
            shutil.copyfile(source_gen, tmp / "generation_config.json")
        else:
            gen = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if ids.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if lm.tokenizer is not None:
            save_tokenizer(lm.tokenizer, tmp, source=lm.source_dir)
        replace_dir(tmp, out)
    except Exception as e:  # as save_hf's
        error = io_error(e, out, tmp)
        if error is None:
            raise
        raise error from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
