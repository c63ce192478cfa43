"""Token lengths of the s1K questions + reference solutions, rendered as training renders them with the
Dream tokenizer (chat template, response + eos). Writes bench/s1k_lengths.json (numbers only, no text),
which bench/train_step.py uses for its packing measurement on a GPU machine that lacks the s1K data.

    python bench/s1k_lengths.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamtune.data import encode_examples  # noqa: E402
from dreamtune.models import load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    rows = json.loads((SHARED / "s1k" / "s1k_question_solution.json").read_text())
    tok = load_tokenizer(SHARED / "tokenizer-dream")
    enc = encode_examples(tok, [r["problem"] for r in rows], [r["solution"] for r in rows])
    out = {"source": "s1k/s1k_question_solution.json (problem, solution), Dream tokenizer, chat template",
           "prompt": [len(p) for p, _ in enc], "response": [len(r) for _, r in enc], "total": [len(p) + len(r) for p, r in enc]}
    Path(__file__).with_name("s1k_lengths.json").write_text(json.dumps(out))
    t = sorted(out["total"])
    print(f"{len(t)} rows: min {t[0]}, median {t[len(t) // 2]}, mean {sum(t) / len(t):.0f}, max {t[-1]}")


if __name__ == "__main__":
    main()
