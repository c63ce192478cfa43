"""A Dream-v0-Base-7B download at full size, with random weights, through what a user runs first.

The real repository's small files (config.json, tokenizer_config.json, the 4-shard index, generation
config) plus Qwen2's vocab.json / merges.txt, random bf16 weights in the four shards the index names, then:
`dreamtune.load` (time, warnings, tokenizer facts), `dreamtune generate --chat` with Dream's entropy sampler
and with the fast sampler, and a 3-step LoRA `dreamtune train` from the download. Prints a table and
writes dream_download.json under --out.

    python3 bench/dream_download.py --layout DIR/dream-v0-base-7b \
        --tokenizer DIR/tokenizer-dream --out /tmp/dd              # one GPU, ~6 min, ~30 GB disk
    python3 bench/dream_download.py --layout ... --tokenizer ... --out /tmp/dd --tiny   # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreamtune.tiny import random_download  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def run(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """(exit code, seconds, stdout) of a dreamtune command; its whole output goes to `log`."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    return r.returncode, time.perf_counter() - t0, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", type=Path, required=True, help="the Hub repository's small files")
    ap.add_argument("--tokenizer", type=Path, required=True, help="a directory with vocab.json and merges.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (a smoke test of this script)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    a.out.mkdir(parents=True, exist_ok=True)
    d = a.out / "Dream-v0-Base-7B"
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": a.tiny}

    t0 = time.perf_counter()
    random_download(a.layout, d, [a.tokenizer / "vocab.json", a.tokenizer / "merges.txt"], TINY if a.tiny else None,
                    dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    res["write_s"] = round(time.perf_counter() - t0, 1)
    res["download_gb"] = round(sum(f.stat().st_size for f in d.iterdir()) / 1e9, 2)
    torch.cuda.empty_cache() if cuda else None

    import dreamtune

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())
        logging.getLogger("transformers").addHandler(handler)
        t0 = time.perf_counter()
        lm = dreamtune.load(d, dtype="bf16", device="cuda" if cuda else "cpu")
        res["load_s"] = round(time.perf_counter() - t0, 1)
    res["load_warnings"] = [str(w.message)[:120] for w in caught] + [m[:120] for m in records]
    tok = lm.tokenizer
    res["tokenizer"] = {"class": type(tok).__name__, "len": len(tok), "mask": lm.mask_token_id, "eos": tok.eos_token_id,
                        "pad": tok.pad_token_id, "chat_template": bool(tok.chat_template), "stop_ids": lm.stop_ids,
                        "encodes": tok.encode("Hello world, 12+34=46.")}
    res["parameters_b"] = round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3)
    del lm
    torch.cuda.empty_cache() if cuda else None

    base = [sys.executable, "-m", "dreamtune.cli"]
    n = "16" if a.tiny else "128"
    for name, extra in (("entropy", ["--alg", "entropy"]), ("fast", ["--alg", "fast", "--block-length", "32"])):
        code, dt, stdout = run(base + ["generate", "--model", str(d), "What is 7*8?", "--chat", "--max-new-tokens", n,
                                       *extra, "--json"], a.out / f"generate_{name}.log")
        out = json.loads(stdout) if code == 0 else None
        res[f"generate_{name}"] = {"exit": code, "wall_s": round(dt, 1),
                                   **({k: out[k] for k in ("nfe", "time_s", "answer_tokens")} if out else {})}

    rows = a.out / "data"
    rows.mkdir(exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [{"prompt": f"What is {i}+{2 * i}?", "response": f"{i}+{2 * i}={3 * i}. Answer: {3 * i}"} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(data), rows / "train.parquet")
    code, dt, _ = run(base + ["train", "configs/dream7b_s1k_lora.yaml", f"model.partial_pretrain={d}",
                              f"data.train_files={rows / 'train.parquet'}", "data.val_files=[]", "data.max_length=128",
                              "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3",
                              f"trainer.default_local_dir={a.out / 'run'}", "trainer.logger=['console']", "model.compile=false",  # a smoke run: no compile time
                              *(["trainer.device=cpu", "model.offload_embeddings=false"] if not cuda else [])],
                       a.out / "train.log")
    res["train_lora_3_steps"] = {"exit": code, "wall_s": round(dt, 1)}
    (a.out / "dream_download.json").write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:<20} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
