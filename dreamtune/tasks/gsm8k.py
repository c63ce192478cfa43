"""GSM8K: grade-school word problems; the reference answer is the integer after `####`.

Local: `<data_dir>/gsm8k/test.jsonl` (and `train.jsonl` for few-shot exemplars), rows
`{question, answer}` where `answer` is the worked solution ending in `#### N`. Hub: openai/gsm8k, main.
Rows: `{"id", "task", "question", "answer" (e.g. "18"; thousands commas removed), "solution"}`.
"""

from __future__ import annotations

import random

from dreamtune.tasks.common import canonical_answer, finish, pick, source_rows

NAMES = ("gsm8k",)
HUB = {"gsm8k": ("openai/gsm8k", "main", "test")}
FEWSHOT_K = 8  # the Dream paper's base-model setting (8-shot)

# Built-in exemplars (written for dreamtune, in GSM8K's solution style) for when no train split is at
# hand; `fewshot_examples(data_dir=...)` samples real ones from train.jsonl instead.
EXEMPLARS = [
    ("Tom has 3 boxes with 12 pencils each. He gives away 10 pencils. How many pencils does he have left?",
     "Tom has 3 * 12 = 36 pencils.\nAfter giving away 10, he has 36 - 10 = 26 pencils.\n#### 26"),
    ("A baker sells muffins for $2 each. On Monday she sells 15 muffins and on Tuesday twice as many. "
     "How much money does she make on the two days?",
     "On Tuesday she sells 15 * 2 = 30 muffins.\nShe sells 15 + 30 = 45 muffins in total.\n"
     "She makes 45 * 2 = $90.\n#### 90"),
    ("Lena reads 20 pages a day. Her book has 240 pages and she has already read 60. "
     "How many more days does she need to finish it?",
     "She has 240 - 60 = 180 pages left.\nShe needs 180 / 20 = 9 days.\n#### 9"),
    ("A class has 28 students. One quarter of them walk to school and the rest take the bus. "
     "How many take the bus?",
     "28 / 4 = 7 students walk.\n28 - 7 = 21 students take the bus.\n#### 21"),
    ("Sam buys 4 notebooks at $3 each and a pen for $2. He pays with a $20 bill. How much change does he get?",
     "The notebooks cost 4 * 3 = $12.\nIn total he spends 12 + 2 = $14.\nHis change is 20 - 14 = $6.\n#### 6"),
    ("A garden has 6 rows of 8 tulips. Half of the tulips are red. How many tulips are not red?",
     "There are 6 * 8 = 48 tulips.\nHalf of them, 48 / 2 = 24, are red, so 48 - 24 = 24 are not red.\n#### 24"),
    ("A car travels 55 miles per hour for 3 hours and then 40 miles per hour for 2 hours. "
     "How many miles does it travel?",
     "First it travels 55 * 3 = 165 miles.\nThen it travels 40 * 2 = 80 miles.\n"
     "In total it travels 165 + 80 = 245 miles.\n#### 245"),
    ("Mia saves $15 every week. How many weeks does she need to save $1,200 for a trip?",
     "She needs 1200 / 15 = 80 weeks.\n#### 80"),
]


def _row(r: dict, i: int, where: str) -> dict:
    solution = str(pick(r, "answer", "solution", what="answer", where=where))
    if "####" not in solution:
        raise ValueError(f"{where}: row {i + 1}'s answer has no '#### N' final line (GSM8K format)")
    return {
        "id": str(r.get("id", i)),
        "task": "gsm8k",
        "question": str(pick(r, "question", "problem", what="question", where=where)),
        "answer": canonical_answer(solution.rsplit("####", 1)[1].strip()),
        "solution": solution,
    }


def load(name: str = "gsm8k", data_dir=None, limit: int | None = None, split: str = "test") -> list[dict]:
    assert name in NAMES, name
    raw, where = source_rows(name, data_dir, HUB, split)
    return finish([_row(r, i, where) for i, r in enumerate(raw)], limit)


def fewshot_examples(k: int = FEWSHOT_K, data_dir=None, seed: int = 0) -> list[dict]:
    """k exemplars `{question, solution}`: sampled (seeded) from the train split under data_dir, or
    the built-in ones when data_dir is None."""
    if data_dir is None:
        if k > len(EXEMPLARS):
            raise ValueError(f"only {len(EXEMPLARS)} built-in GSM8K exemplars; pass data_dir for more, or k <= {len(EXEMPLARS)}")
        return [{"question": q, "solution": s} for q, s in EXEMPLARS[:k]]
    train = load("gsm8k", data_dir, split="train")
    if k > len(train):
        raise ValueError(f"k={k} exemplars asked but the train split has {len(train)} rows")
    return [{"question": r["question"], "solution": r["solution"]} for r in random.Random(seed).sample(train, k)]
