"""Tokenizers from files, checked; and tokenizer files that transformers 4.46 (Dream's and LLaDA's own code) reads.

    from dreamtune.tokenizer import load_tokenizer, save_tokenizer
    tok = load_tokenizer(Path("Dream-v0-Base-7B"), config)   # config: the model's config.json as a dict
    save_tokenizer(tok, Path("export"), source=Path("Dream-v0-Base-7B"))

Every verb reads tokenizers through `load_tokenizer` (via dreamtune.models.load, or `tokenizer_from` for a
tokenizer alone). It never runs or consults remote code, and never prompts on stdin:
- a `tokenizer.json` is read as it is (PreTrainedTokenizerFast), with tokenizer_config.json's special
  tokens and chat template (Qwen2.5, Llama 3, LLaDA, dreamtune's own exports);
- otherwise the class named in tokenizer_config.json reads the vocabulary files. Dream's repository names a
  remote-code `DreamTokenizer`; its encoding is Qwen2's byte-level BPE over the same vocab.json and
  merges.txt, so `Qwen2Tokenizer` reads it (with its added tokens, chat template and special tokens).
The model's config.json is never opened by transformers here (AutoTokenizer would follow its auto_map).

A tokenizer that comes out wrong is an error naming the files, never a silent result: it must encode plain
text to tokens that decode back, and hold every special id the model's config names (eos, bos, pad, mask).
"""

from __future__ import annotations

import json
from pathlib import Path

from dreamtune.hub import read_json_file, resolve_dir

REDOWNLOAD = "re-download the tokenizer files"  # what to do about a damaged tokenizer JSON file

# Remote-code tokenizer classes, and the transformers class that reads the same files identically.
REMOTE_CODE_TOKENIZERS = {"DreamTokenizer": "Qwen2Tokenizer"}
# Files that make up a tokenizer (any one of the first four means the directory has one).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# Tokens that end a chat turn in the templates dreamtune meets (ChatML, Llama 3 / LLaDA).
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>")
SPECIAL_ID_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id", "mask_token_id")
PROBE = "The answer is 42, not 7."
# tokenizer_config.json keys transformers 5 writes that mean nothing to a reader of the files
_SAVE_NOISE = ("is_local", "local_files_only", "auto_map")


def has_tokenizer(d: Path) -> bool:
    return any((Path(d) / f).exists() for f in TOKENIZER_FILES[:4])


def ids_of(value) -> list[int]:
    """A config's token id entry (an int, a list of ints, or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def load_tokenizer(d: Path, config: dict | None = None):
    """The tokenizer in directory `d`, checked against the model's config.json (a dict; its eos/bos/pad/mask
    ids must be tokens of this tokenizer). None when `d` holds no tokenizer files."""
    d = Path(d)
    if not has_tokenizer(d):
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    tcfg = read_json_file(d / "tokenizer_config.json", REDOWNLOAD) if (d / "tokenizer_config.json").exists() else {}
    name = tcfg.get("tokenizer_class")
    if (d / "tokenizer.json").exists():
        cls = PreTrainedTokenizerFast  # the file is the whole pipeline: read it as it is
    elif name is None:
        raise ValueError(f"{d} has tokenizer files but no tokenizer.json and no tokenizer_class in tokenizer_config.json, "
                         f"so it cannot be read without guessing; add the model's tokenizer.json")
    else:
        cls = tokenizer_class_from_name(REMOTE_CODE_TOKENIZERS.get(name, name))
        if cls is None:
            raise ValueError(f"{d}/tokenizer_config.json names tokenizer class '{name}', which is remote code that "
                             f"dreamtune does not run and transformers does not have; add the model's tokenizer.json")
    try:
        tok = cls.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001  the tokenizers library raises plain Exception on a bad vocabulary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read {_files(d)} ({first}); re-download the model's tokenizer files") from None
    check_tokenizer(tok, d, config or {})
    backend = getattr(tok, "backend_tokenizer", None)
    if getattr(tok, "clean_up_tokenization_spaces", False) and type(getattr(backend, "model", None)).__name__ == "BPE":
        # LLaDA's tokenizer_config.json asks for it; transformers skips that clean-up for a BPE model (it would
        # strip spaces before punctuation) and warns at every first decode. Skip it without the warning; an
        # export writes the source's value back (save_tokenizer), so LLaDA's own code reads what it always did.
        tok.clean_up_tokenization_spaces = False
    if tok.pad_token_id is None:  # Dream: pad == eos, and trailing pads are trained targets
        pad = ids_of((config or {}).get("pad_token_id"))
        tok.pad_token = tok.convert_ids_to_tokens(pad[0]) if pad else tok.eos_token
    return tok


def _files(d: Path) -> str:
    """The tokenizer files in d, for error messages: 'DIR (tokenizer.json, tokenizer_config.json)'."""
    return f"{d} ({', '.join(f for f in TOKENIZER_FILES if (Path(d) / f).exists())})"


def check_tokenizer(tok, d: Path, config: dict) -> None:
    """ValueError naming the files when `tok` cannot be the tokenizer of the model `config` describes."""
    where = f"the tokenizer read from {_files(d)}"
    n = len(tok)
    ids = tok.encode(PROBE, add_special_tokens=False)
    if not ids or all(i == tok.unk_token_id for i in ids):
        raise ValueError(f"{where} encodes plain text to {ids[:8]} ({n} tokens in all): the files are incomplete or "
                         f"of another format; re-download the model's tokenizer files")
    for key in SPECIAL_ID_KEYS:
        for i in ids_of(config.get(key)):
            if not 0 <= i < n:
                raise ValueError(f"{where} has {n} tokens, but config.json's {key} is {i}: the tokenizer files do not "
                                 f"belong to this model or are incomplete; re-download them")
    for i in ids_of(config.get("mask_token_id")):
        token = tok.convert_ids_to_tokens(i)
        if token is None or tok.convert_tokens_to_ids(token) != i or tok.encode(token, add_special_tokens=False) != [i]:
            raise ValueError(f"{where} cannot encode the mask token (id {i}, '{token}') as one token; the tokenizer "
                             f"files do not belong to this model")


def tokenizer_from(path_or_id: str):
    """A tokenizer alone, from a model directory, a tokenizer directory or a hub id (`dreamtune data validate`):
    read exactly as training reads it, checked against config.json when the directory has one."""
    d = resolve_dir(path_or_id, what="tokenizer")
    config = read_json_file(d / "config.json", REDOWNLOAD) if (d / "config.json").exists() else {}
    tok = load_tokenizer(d, config)
    if tok is None:
        raise ValueError(f"{d} holds no tokenizer files (tokenizer.json, or vocab.json + tokenizer_config.json); "
                         f"pass the model's directory or its hub id")
    return tok


def save_tokenizer(tok, out: Path, source: Path | None = None) -> None:
    """Write the tokenizer so that dreamtune, transformers 5 and transformers 4.46 all read it alike.

    transformers 5 keeps the chat template in chat_template.jinja, names its generic class TokenizersBackend
    and copies the source's auto_map; 4.46 reads only tokenizer_config.json's `chat_template`, knows no
    TokenizersBackend, and would follow the auto_map to remote code that is not there. The source's vocabulary
    files (vocab.json, merges.txt) are copied too, so a slow tokenizer built on them (Dream's) reads the export."""
    import shutil

    out = Path(out)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = read_json_file(cfg_path, REDOWNLOAD) if cfg_path.exists() else {}
    for key in _SAVE_NOISE:
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(tok.chat_template, str):
        cfg["chat_template"] = tok.chat_template
    source_cfg = Path(source) / "tokenizer_config.json" if source is not None else None
    source_tcfg = read_json_file(source_cfg, REDOWNLOAD) if source_cfg is not None and source_cfg.is_file() else {}
    if "clean_up_tokenization_spaces" in source_tcfg:
        cfg["clean_up_tokenization_spaces"] = source_tcfg["clean_up_tokenization_spaces"]  # see load_tokenizer
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in cfg:
        cfg["additional_special_tokens"] = extra  # the name 4.46 reads
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    if source is not None:
        for f in ("vocab.json", "merges.txt"):
            if (Path(source) / f).is_file() and not (out / f).exists():
                shutil.copyfile(Path(source) / f, out / f)
