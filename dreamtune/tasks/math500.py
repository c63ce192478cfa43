"""MATH-500: competition problems with LaTeX answers (the MATH test subset used by PRM800K).

Local: `<data_dir>/math500/test.jsonl`, rows `{problem, solution, answer, subject, level, unique_id}`.
Hub: HuggingFaceH4/MATH-500 (test). Rows: `{"id" (unique_id), "task", "question", "answer" (LaTeX, as
given), "solution", "subject", "level"}`. The built-in MATH-style exemplars here also serve the AIME and
AMC few-shot prompts (the Dream paper evaluates MATH 4-shot).
"""

from __future__ import annotations

from dreamtune.tasks.common import finish, pick, source_rows

NAMES = ("math500",)
HUB = {"math500": ("HuggingFaceH4/MATH-500", None, "test")}
FEWSHOT_K = 4

# Written for dreamtune in the MATH solution style; each ends with the answer in \boxed{}.
EXEMPLARS = [
    ("Find the domain of the function $f(x) = \\sqrt{x-2} + \\sqrt{5-x}$.",
     "Both radicands must be non-negative. From $x - 2 \\ge 0$ we get $x \\ge 2$, and from $5 - x \\ge 0$ we "
     "get $x \\le 5$. So the domain is $\\boxed{[2,5]}$."),
    ("If $3x + 7 = 25$, what is the value of $x^2$?",
     "Subtracting 7 gives $3x = 18$, so $x = 6$. Then $x^2 = \\boxed{36}$."),
    ("A fair six-sided die is rolled. What is the probability that it shows a prime number? "
     "Express your answer as a common fraction.",
     "The primes among $1, 2, \\dots, 6$ are $2$, $3$ and $5$: three of the six equally likely outcomes. "
     "The probability is $\\frac{3}{6} = \\boxed{\\frac{1}{2}}$."),
    ("Simplify $\\sqrt{72}$.",
     "Since $72 = 36 \\cdot 2$ and $36$ is a perfect square, $\\sqrt{72} = \\sqrt{36}\\sqrt{2} = \\boxed{6\\sqrt{2}}$."),
]


def _row(r: dict, i: int, where: str) -> dict:
    row = {
        "id": str(r.get("unique_id", r.get("id", i))),
        "task": "math500",
        "question": str(pick(r, "problem", "question", what="problem", where=where)),
        "answer": str(pick(r, "answer", what="answer", where=where)).strip(),
    }
    for k in ("solution", "subject", "level"):
        if k in r:
            row[k] = r[k]
    return row


def load(name: str = "math500", data_dir=None, limit: int | None = None) -> list[dict]:
    assert name in NAMES, name
    raw, where = source_rows(name, data_dir, HUB)
    return finish([_row(r, i, where) for i, r in enumerate(raw)], limit)


def fewshot_examples(k: int = FEWSHOT_K, data_dir=None, seed: int = 0) -> list[dict]:
    """k built-in exemplars `{question, solution}` (no MATH train split is kept locally)."""
    if k > len(EXEMPLARS):
        raise ValueError(f"only {len(EXEMPLARS)} built-in MATH exemplars; use k <= {len(EXEMPLARS)} or pass shots=")
    return [{"question": q, "solution": s} for q, s in EXEMPLARS[:k]]
