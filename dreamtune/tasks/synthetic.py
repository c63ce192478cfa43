"""Synthetic reasoning tasks with worked solutions and exact graders, small enough for a tiny model.

Each task makes rows in the shape of s1K (question, worked reasoning, final answer):
`{"prompt": question, "response": worked steps + "\\nAnswer: X", "answer": X}`. Texts are short and
use a small alphabet (`alphabet(task)`) so a character-level model can learn them on a CPU in minutes.

- `arithmetic`: multi-digit multiplication with partial products, or addition column by column with
  carries. Options: `op` ("mul" default, "add", "mix"), `digits` (first operand, default 3), `digits2`
  (second operand: an int or an inclusive (lo, hi) range; default (1, 2) for mul, `digits` for add).
      347*28=?   ->  347*8=2776 / 347*20=6940 / 2776+6940=9716 / Answer: 9716
      458+367=?  ->  8+7=15 / 5+6+1=12 / 4+3+1=8 / Answer: 825   (each line: a column, "+1" a carry)
- `sudoku`: 4x4 (2x2 boxes), `blanks` empty cells (default 4, at most 10). Every puzzle has exactly one
  solution and is solvable by "naked singles" alone; the response fills one forced cell per line in
  that order, then gives the grid.
      prompt "12.4\\n3..2\\n2143\\n4.21"  ->  r1c3=3 / r2c2=4 / ... / Answer: 1234 3412 2143 4321

Generation is seeded (`random.Random(seed)`): the same seed gives the same rows.

As benchmark tasks (`dreamtune eval --tasks arithmetic`, `compare --task sudoku`): `load` reads
`<data_dir>/<task>/test.jsonl` (rows `{id?, question, answer}`, e.g. the held-out problems a run did not
train on), or without a data directory makes `limit` (default 200) rows with the task's default options and
a fixed seed. The prompt is the bare question (as the rows were trained), graded by `grade_synthetic`.
"""

from __future__ import annotations

import random
import re

SYNTHETIC_TASKS = ("arithmetic", "sudoku")
NAMES = SYNTHETIC_TASKS
FEWSHOT_K = 0  # no few-shot format: the rows are trained as bare questions
HELD_OUT_SEED = 1_000_003  # rows made for evaluation without a file; training data is made with small seeds
DEFAULT_EVAL_ROWS = 200
_OPTIONS = {"arithmetic": ("op", "digits", "digits2"), "sudoku": ("blanks",)}
_ANSWER_WORD = "Answer:"
MAX_SUDOKU_BLANKS = 10


def alphabet(task: str) -> str:
    """Every character the task's prompts and responses use, sorted (for a tiny char tokenizer)."""
    _check_task(task)
    chars = set(_ANSWER_WORD) | set(" \n")
    if task == "arithmetic":
        chars |= set("0123456789+*=?")
    else:
        chars |= set("1234.rc=")
    return "".join(sorted(chars))


def _check_task(task: str) -> None:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from: {', '.join(SYNTHETIC_TASKS)}")


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------


def _operand(rng: random.Random, digits: int) -> int:
    # no single-digit 0 or 1: "x*1" and "x+0" teach nothing
    return rng.randint(max(2, 10 ** (digits - 1)), 10**digits - 1)


def _mul_steps(a: int, b: int) -> list[str]:
    """Partial products: by each non-zero digit of b at its place (long multiplication), or, for a
    one-digit b, of each non-zero digit of a at its place times b; then their sum."""
    if b >= 10:
        parts = [(a, int(d) * 10**k) for k, d in enumerate(reversed(str(b))) if d != "0"]
    else:
        parts = [(int(d) * 10**k, b) for k, d in reversed(list(enumerate(reversed(str(a))))) if d != "0"]
    lines = [f"{x}*{y}={x * y}" for x, y in parts]
    if len(parts) > 1:
        lines.append("+".join(str(x * y) for x, y in parts) + f"={a * b}")
    return lines


def _add_steps(a: int, b: int) -> list[str]:
    """Column addition from the units: 'x+y=s', or 'x+y+1=s' with a carry in; the last digit of s is the
    answer's digit, its tens the carry out."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, lines = 0, []
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return lines


def _arithmetic_row(rng: random.Random, op: str = "mul", digits: int = 3, digits2=None) -> dict:
    if op == "mix":
        op = rng.choice(("add", "mul"))
    if digits2 is None:
        digits2 = (1, 2) if op == "mul" else digits
    lo, hi = (digits2, digits2) if isinstance(digits2, int) else digits2
    a, b = _operand(rng, digits), _operand(rng, rng.randint(lo, hi))
    if op == "mul":
        sym, ans, steps = "*", a * b, _mul_steps(a, b)
    else:
        sym, ans, steps = "+", a + b, _add_steps(a, b)
    answer = str(ans)
    return {"prompt": f"{a}{sym}{b}=?", "response": "\n".join(steps) + f"\n{_ANSWER_WORD} {answer}", "answer": answer}


def _check_arithmetic_opts(op="mul", digits=3, digits2=None) -> None:
    if op not in ("add", "mul", "mix"):
        raise ValueError(f"arithmetic op must be 'add', 'mul' or 'mix', got {op!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"arithmetic digits must be an integer 1-9, got {digits!r}")
    if digits2 is not None:
        rng = (digits2, digits2) if isinstance(digits2, int) else tuple(digits2) if isinstance(digits2, (list, tuple)) else None
        if rng is None or len(rng) != 2 or not all(isinstance(d, int) for d in rng) or not 1 <= rng[0] <= rng[1] <= 9:
            raise ValueError(f"arithmetic digits2 must be an integer 1-9 or a range (lo, hi) with 1 <= lo <= hi <= 9, got {digits2!r}")


# ---------------------------------------------------------------------------------------------
# 4x4 sudoku
# ---------------------------------------------------------------------------------------------


def _candidates(grid: list[list[int]], r: int, c: int) -> list[int]:
    br, bc = 2 * (r // 2), 2 * (c // 2)
    used = set(grid[r]) | {grid[i][c] for i in range(4)} | {grid[i][j] for i in (br, br + 1) for j in (bc, bc + 1)}
    return [v for v in (1, 2, 3, 4) if v not in used]


def _full_grid(rng: random.Random) -> list[list[int]]:
    grid = [[0] * 4 for _ in range(4)]

    def fill(pos: int) -> bool:
        if pos == 16:
            return True
        r, c = divmod(pos, 4)
        vals = _candidates(grid, r, c)
        rng.shuffle(vals)
        for v in vals:
            grid[r][c] = v
            if fill(pos + 1):
                return True
        grid[r][c] = 0
        return False

    assert fill(0)
    return grid


def count_sudoku_solutions(grid: list[list[int]], limit: int = 2) -> int:
    """Solutions of a 4x4 grid (0 = blank), counting up to `limit`."""
    g = [row[:] for row in grid]
    blanks = [(r, c) for r in range(4) for c in range(4) if g[r][c] == 0]

    def count(k: int) -> int:
        if k == len(blanks):
            return 1
        r, c = blanks[k]
        n = 0
        for v in _candidates(g, r, c):
            g[r][c] = v
            n += count(k + 1)
            g[r][c] = 0
            if n >= limit:
                break
        return n

    return count(0)


def _forced_order(puzzle: list[list[int]]) -> list[tuple[int, int, int]] | None:
    """Fill order by naked singles (the first blank in reading order with one candidate, repeatedly),
    or None when the puzzle needs more than that."""
    g = [row[:] for row in puzzle]
    steps = []
    while True:
        blanks = [(r, c) for r in range(4) for c in range(4) if g[r][c] == 0]
        if not blanks:
            return steps
        for r, c in blanks:
            cand = _candidates(g, r, c)
            if len(cand) == 1:
                g[r][c] = cand[0]
                steps.append((r, c, cand[0]))
                break
        else:
            return None


def _grid_text(grid: list[list[int]], sep: str) -> str:
    return sep.join("".join(str(v) if v else "." for v in row) for row in grid)


def _sudoku_row(rng: random.Random, blanks: int = 4) -> dict:
    for _ in range(100):
        solution = _full_grid(rng)
        for _ in range(20):
            cells = rng.sample(range(16), blanks)
            puzzle = [row[:] for row in solution]
            for cell in cells:
                puzzle[cell // 4][cell % 4] = 0
            order = _forced_order(puzzle)
            if order is not None:
                assert count_sudoku_solutions(puzzle) == 1  # naked singles only => unique
                steps = [f"r{r + 1}c{c + 1}={v}" for r, c, v in order]
                answer = _grid_text(solution, " ")
                return {
                    "prompt": _grid_text(puzzle, "\n"),
                    "response": "\n".join(steps) + f"\n{_ANSWER_WORD} {answer}",
                    "answer": answer,
                }
    raise AssertionError(f"no 4x4 sudoku with {blanks} blanks solvable by naked singles found")  # pragma: no cover


def parse_sudoku(prompt: str) -> list[list[int]]:
    """The grid of a sudoku prompt (0 = blank)."""
    rows = prompt.strip().split("\n")
    if len(rows) != 4 or any(not re.fullmatch(r"[1-4.]{4}", r) for r in rows):
        raise ValueError(f"not a 4x4 sudoku prompt: {prompt!r}")
    return [[0 if ch == "." else int(ch) for ch in r] for r in rows]


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def make_rows(task: str, n: int, seed: int, **opts) -> list[dict]:
    """n rows `{"prompt", "response", "answer"}` of a synthetic task, deterministic for a seed.

    arithmetic options: op ("mul" | "add" | "mix"), digits (int), digits2 (int or (lo, hi)).
    sudoku options: blanks (1-10).
    """
    _check_task(task)
    unknown = sorted(set(opts) - set(_OPTIONS[task]))
    if unknown:
        raise ValueError(f"unknown option(s) for {task}: {', '.join(unknown)}; allowed: {', '.join(_OPTIONS[task])}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    if task == "arithmetic":
        _check_arithmetic_opts(**opts)
        if isinstance(opts.get("digits2"), list):
            opts["digits2"] = tuple(opts["digits2"])
        return [_arithmetic_row(rng, **opts) for _ in range(n)]
    blanks = opts.get("blanks", 4)
    if not isinstance(blanks, int) or not 1 <= blanks <= MAX_SUDOKU_BLANKS:
        raise ValueError(f"sudoku blanks must be an integer 1-{MAX_SUDOKU_BLANKS}, got {blanks!r}")
    return [_sudoku_row(rng, blanks) for _ in range(n)]


def final_answer(response: str) -> str | None:
    """The text after the first "Answer:" (to the end of its line), whitespace collapsed; None if absent.

    The first, not the last: the worked format has exactly one Answer line, and whatever a tiny model
    writes after it (it may fill the rest of its canvas) is not its answer.
    """
    m = re.search(r"Answer:[ \t]*([^\n]*)", response or "")
    return " ".join(m.group(1).split()) if m else None


def grade_synthetic(task: str, response: str, answer) -> bool:
    """Exact grading: the response's final answer equals the reference (whitespace-insensitive)."""
    _check_task(task)
    got = final_answer(response)
    return got is not None and got == " ".join(str(answer).split())


def load(name: str, data_dir=None, limit: int | None = None) -> list[dict]:
    """Benchmark rows `{"id", "task", "question", "answer"}` (see the module docstring)."""
    from dreamtune.tasks.common import finish, local_file, pick, read_jsonl

    _check_task(name)
    if data_dir is not None:
        path = local_file(name, data_dir)
        raw = read_jsonl(path)
        rows = [{"id": str(r.get("id", i)), "task": name, "question": pick(r, "question", "prompt", what="question", where=str(path)),
                 "answer": " ".join(str(pick(r, "answer", what="answer", where=str(path))).split())} for i, r in enumerate(raw)]
    else:
        made = make_rows(name, DEFAULT_EVAL_ROWS if limit is None else limit, HELD_OUT_SEED)
        rows = [{"id": str(i), "task": name, "question": r["prompt"], "answer": str(r["answer"])} for i, r in enumerate(made)]
    return finish(rows, limit)


def fewshot_examples(k: int, data_dir=None, seed: int = 0) -> list[dict]:
    if k:
        raise ValueError("synthetic tasks have no few-shot format: evaluate them with --prompt-format chat")
    return []
