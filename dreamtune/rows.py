"""Row and column checks shared by every data command and the trainer: a prompt is a string or a list of
{role, content} messages, a response a non-empty string; a missing column names the nearest one.

    from dreamtune.rows import check_columns
    check_columns(rows, "prompt", "response")   # ValueError naming the row and column
"""

from __future__ import annotations

import difflib

# Rows with these columns are s1K-1.1's: a missing column then comes with a pointer to --format s1k-1.1.
S1K11_COLUMNS = ("deepseek_thinking_trajectory", "deepseek_attempt", "gemini_thinking_trajectory")


def require_columns(rows: list[dict], names: list[str]) -> None:
    """ValueError naming the first absent column, the available ones and the nearest match."""
    available = list(dict.fromkeys(k for row in rows for k in row))
    for name in names:
        if name in available:
            continue
        near = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
        hint = f"; did you mean '{near[0]}'?" if near else "; no close match"
        if all(c in available for c in S1K11_COLUMNS):
            hint += " (these rows have s1K-1.1's columns: use --format s1k-1.1)"
        raise ValueError(f"column '{name}' not found; available columns: {', '.join(available) or '(none)'}{hint}")


def text_field(row: dict, column: str, index: int) -> str:
    """The row's non-empty string in `column`, or a ValueError naming the row."""
    value = row.get(column)
    if not isinstance(value, str):
        got = "missing" if value is None else f"of type {type(value).__name__}, not a string"
        raise ValueError(f"row {index}: column '{column}' is {got}")
    if not value.strip():
        raise ValueError(f"row {index}: column '{column}' is empty")
    return value


def to_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; a list of {role, content} is checked."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):  # a numpy/pandas array of messages
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("a prompt must be a string or a non-empty list of {role, content} messages, "
                         f"got {type(prompt).__name__}")
    for j, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise ValueError(f"prompt message {j} must be {{'role': str, 'content': str}}, got {str(m)[:80]}")
    return list(prompt)


def check_columns(rows: list[dict], prompt_key: str, response_key: str) -> None:
    """Every row has a usable prompt (string or messages) and a non-empty string response."""
    if not rows:
        raise ValueError("the data has no rows")
    require_columns(rows, [prompt_key, response_key])
    for i, row in enumerate(rows):
        try:
            to_messages(row.get(prompt_key))
        except ValueError as e:
            raise ValueError(f"row {i}: column '{prompt_key}': {e}") from None
        text_field(row, response_key, i)
