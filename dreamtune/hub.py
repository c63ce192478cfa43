"""Where a model or tokenizer lives: a local directory, or a Hugging Face Hub id (downloaded to the HF cache).

    from dreamtune.hub import resolve_dir
    d = resolve_dir("Dream-org/Dream-v0-Base-7B")           # the cached snapshot, downloaded if needed
    d = resolve_dir("checkpoints/exp1/checkpoint-final")    # a local directory, as is

A string is read as a local path when it could not be a hub id, or when its first component exists on
disk (`checkpoints/nope` beside a `checkpoints/` folder is a mistyped local path, named as such at once,
not a Hub lookup). A hub id is looked up in the local cache first, so a downloaded model loads offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

# What a model download needs (no remote code: *.py is never fetched).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"]
# What a tokenizer needs (config.json: the model's special token ids, to check the tokenizer against).
TOKENIZER_FILES = ["tokenizer*", "vocab.json", "merges.txt", "*.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", "config.json", "generation_config.json"]


def looks_local(s: str) -> bool:
    """True when `s` can only be a local path: not of the form org/name, or its first part is on disk."""
    p = Path(s).expanduser()
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or p.exists():
        return True
    return Path(s.split("/")[0]).is_dir()


def resolve_dir(path_or_id: str | os.PathLike, what: str = "model", download: bool = True) -> Path | None:
    """A local directory as is; a hub id as its snapshot in the HF cache (downloaded unless download=False,
    which returns None for a hub id that is not cached). Errors name the path and what to do."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if looks_local(s):
        if p.exists():
            raise NotADirectoryError(f"'{s}' is a file; pass the {what}'s directory (the one holding config.json)")
        raise FileNotFoundError(f"{what} directory '{s}' does not exist; pass a local {what} directory or a hub id "
                                f"like Dream-org/Dream-v0-Base-7B")
    from huggingface_hub import snapshot_download

    patterns = TOKENIZER_FILES if what == "tokenizer" else MODEL_FILES
    try:  # the cache first: no network needed for a model downloaded before
        return Path(snapshot_download(s, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001  not cached (any form of it)
        if not download:
            return None
    offline = False
    try:
        with hub_offline_if_unreachable() as offline:
            return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001  offline, unknown repo, gated repo: all mean "use a local directory"
        raise ValueError(
            f"'{s}' is not a local directory and could not be fetched from the Hugging Face Hub ({'the Hub cannot be reached' if offline else type(e).__name__}); "
            f"if this machine is offline, download it elsewhere (hf download {s} --local-dir DIR) and pass that "
            f"directory") from None


@contextlib.contextmanager
def hub_offline_if_unreachable(timeout: float = 3.0):
    """Run the block in Hugging Face offline mode when the hub cannot be reached, so that a missing
    network fails at once (cached files still load) instead of after about 25 s of retries. Yields
    whether it did so."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        if not (offline or proxied):
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield False
        return
    import huggingface_hub.constants as hub_constants

    # The libraries read HF_HUB_OFFLINE at import: set the variable for a later `import datasets`, and
    # the already-imported flags; put everything back afterwards.
    ds_config = sys.modules.get("datasets.config")
    saved = hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE if ds_config else False
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    if ds_config:
        ds_config.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)
        hub_constants.HF_HUB_OFFLINE = saved[0]
        if "datasets.config" in sys.modules:
            sys.modules["datasets.config"].HF_HUB_OFFLINE = saved[1]


def read_json_file(path: Path, fix: str) -> dict:
    """A model or tokenizer directory's JSON object file (config.json and the like); ValueError naming it,
    with `fix`, when it is a directory, not UTF-8 text, not JSON or not an object."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not JSON (a damaged file?); {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
