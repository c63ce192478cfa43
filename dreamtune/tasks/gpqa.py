"""GPQA (Diamond): four-choice science questions, read only from a file the user supplies.

Its authors distribute GPQA password-protected and ask that it not be republished in plain text, so
dreamtune never downloads it. Pass `data_dir=` (`--data-dir`) as one of:
- a `.jsonl`/`.json`/`.csv` file, or a directory holding `gpqa/test.jsonl`, `gpqa/test.csv`,
  `gpqa_diamond.csv` or `gpqa/gpqa_diamond.csv`;
- rows `{question, choices: [4 texts] (or a JSON list in a CSV cell, or columns A B C D), answer}` where
  answer is a letter A-D, a 0-based index, or the text of the right choice;
- or the official CSV columns `Question`, `Correct Answer`, `Incorrect Answer 1..3` (choices are then
  shuffled with a seeded generator per row, so the letter of the right answer is reproducible).
Rows: `{"id", "task", "question" (with the lettered choices), "problem", "choices", "answer" (letter)}`.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from dreamtune.tasks.common import finish, read_jsonl

NAMES = ("gpqa",)
LETTERS = "ABCD"
FEWSHOT_K = 2
HOW_TO = (
    "GPQA is read only from a file you supply (its authors ask that it not be republished): pass "
    "--data-dir FILE.jsonl|FILE.csv with question, choices, answer per row (or the official GPQA CSV)"
)

EXEMPLARS = [  # written for dreamtune; deliberately easy, they only show the answer format
    ("Which particle carries a negative electric charge?\n\nA) proton\nB) neutron\nC) electron\nD) photon",
     "Protons are positive, neutrons and photons are neutral, and electrons are negative. "
     "The answer is \\boxed{C}."),
    ("What is the approximate pH of pure water at 25 degrees Celsius?\n\nA) 1\nB) 7\nC) 10\nD) 14",
     "Pure water self-ionises to equal concentrations of H+ and OH-, 10^-7 mol/L each, so pH = 7. "
     "The answer is \\boxed{B}."),
]


def _find_file(data_dir) -> Path:
    if data_dir is None:
        raise ValueError(HOW_TO)
    d = Path(data_dir).expanduser()
    if d.is_file():
        return d
    for rel in ("gpqa/test.jsonl", "gpqa/test.csv", "gpqa_diamond.csv", "gpqa/gpqa_diamond.csv", "gpqa/test.json"):
        if (d / rel).is_file():
            return d / rel
    raise ValueError(f"no GPQA file under {d} (looked for gpqa/test.jsonl, gpqa/test.csv, gpqa_diamond.csv); {HOW_TO}")


def _read(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported GPQA file type {suffix!r}; use .jsonl, .json or .csv")


def _row(r: dict, i: int, where: str, seed: int) -> dict:
    rid = str(r.get("id") or r.get("Record ID") or i)
    if "Correct Answer" in r:  # the official CSV
        right = str(r["Correct Answer"]).strip()
        choices = [right] + [str(r[f"Incorrect Answer {k}"]).strip() for k in (1, 2, 3)]
        random.Random(f"{seed}-{rid}").shuffle(choices)
        answer = LETTERS[choices.index(right)]
        question = str(r.get("Question", "")).strip()
    else:
        question = str(r.get("question") or r.get("Question") or "").strip()
        choices = r.get("choices")
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: row {i + 1}: 'choices' must be a list of 4 texts (JSON in a CSV cell)") from None
        if choices is None and all(k in r for k in LETTERS):
            choices = [r[k] for k in LETTERS]
        if not isinstance(choices, list) or len(choices) != 4:
            raise ValueError(f"{where}: row {i + 1}: needs 'choices' with exactly 4 options (or columns A, B, C, D)")
        choices = [str(c).strip() for c in choices]
        raw = r.get("answer")
        if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
            idx = int(raw)
            if not 0 <= idx < 4:
                raise ValueError(f"{where}: row {i + 1}: answer index {idx} is not 0-3")
            answer = LETTERS[idx]
        elif isinstance(raw, str) and raw.strip().strip("()").upper() in LETTERS and len(raw.strip().strip("()")) == 1:
            answer = raw.strip().strip("()").upper()
        elif isinstance(raw, str) and raw.strip() in choices:
            answer = LETTERS[choices.index(raw.strip())]
        else:
            raise ValueError(f"{where}: row {i + 1}: 'answer' must be a letter A-D, an index 0-3 or a choice's text; got {raw!r}")
    if not question:
        raise ValueError(f"{where}: row {i + 1} has no question")
    lettered = "\n".join(f"{L}) {c}" for L, c in zip(LETTERS, choices))
    return {"id": rid, "task": "gpqa", "question": f"{question}\n\n{lettered}", "problem": question,
            "choices": choices, "answer": answer}


def load(name: str = "gpqa", data_dir=None, limit: int | None = None, seed: int = 0) -> list[dict]:
    assert name in NAMES, name
    path = _find_file(data_dir)
    raw = _read(path)
    if not raw:
        raise ValueError(f"{path} has no rows")
    return finish([_row(r, i, str(path), seed) for i, r in enumerate(raw)], limit)


def fewshot_examples(k: int = FEWSHOT_K, data_dir=None, seed: int = 0) -> list[dict]:
    if k > len(EXEMPLARS):
        raise ValueError(f"only {len(EXEMPLARS)} built-in GPQA-style exemplars; use k <= {len(EXEMPLARS)} or pass shots=")
    return [{"question": q, "solution": s} for q, s in EXEMPLARS[:k]]
