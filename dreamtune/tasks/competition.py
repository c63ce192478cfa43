"""Competition answers: AIME 2024, AIME 2025 (integers 0-999) and AMC 2023 (numbers).

Local: `<data_dir>/<name>/test.jsonl`. Published files differ: aime24 answers are strings like "025",
aime25 ints, amc23 floats (27.0); rows here always carry the canonical text ("25", "70", "27").
Hub: aime24 HuggingFaceH4/aime_2024 (train: the 30 problems), aime25 math-ai/aime25 (test),
amc23 math-ai/amc23 (test). Rows: `{"id", "task", "question", "answer", "url"?, "solution"?}`.
Few-shot prompts use the MATH exemplars (dreamtune.tasks.math500).
"""

from __future__ import annotations

from dreamtune.tasks import math500
from dreamtune.tasks.common import canonical_answer, finish, pick, source_rows

NAMES = ("aime24", "aime25", "amc23")
HUB = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("math-ai/aime25", None, "test"),
    "amc23": ("math-ai/amc23", None, "test"),
}
FEWSHOT_K = math500.FEWSHOT_K


def _row(name: str, r: dict, i: int, where: str) -> dict:
    answer = canonical_answer(pick(r, "answer", "Answer", what="answer", where=where))
    if name.startswith("aime") and not (answer.isdigit() and 0 <= int(answer) <= 999):
        raise ValueError(f"{where}: row {i + 1}: an AIME answer must be an integer 0-999, got {answer!r}")
    row = {
        "id": str(pick(r, "id", "ID", what="id", where=where) if ("id" in r or "ID" in r) else i),
        "task": name,
        "question": str(pick(r, "problem", "question", "Problem", what="problem", where=where)),
        "answer": answer,
    }
    for k in ("url", "solution"):
        if r.get(k):
            row[k] = r[k]
    return row


def load(name: str, data_dir=None, limit: int | None = None) -> list[dict]:
    assert name in NAMES, name
    raw, where = source_rows(name, data_dir, HUB)
    return finish([_row(name, r, i, where) for i, r in enumerate(raw)], limit)


fewshot_examples = math500.fewshot_examples
