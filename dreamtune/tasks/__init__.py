"""Benchmark tasks (loading, prompt formats) and synthetic reasoning tasks.

    from dreamtune import tasks
    rows = tasks.load("gsm8k", data_dir="data/eval", limit=5)   # [{id, task, question, answer, ...}]
    msgs = tasks.build_prompt(rows[0], "chat")        # chat messages, for the model's chat template
    text = tasks.build_prompt(rows[0], "fewshot")     # plain few-shot string, base-model style
    answer_text = tasks.truncate_response(generated, "fewshot")  # drop a hallucinated next "Question:"

`TASKS` maps each benchmark name to the module that loads it (one small module per family: gsm8k,
math500, competition = aime24/aime25/amc23, gpqa). Synthetic tasks (`arithmetic`, `sudoku`) live in
`dreamtune.tasks.synthetic` (`make_rows`, `grade_synthetic`, `alphabet`). docs/grading.md describes the
prompt formats.
"""

from __future__ import annotations

from dreamtune.data import DEFAULT_SYSTEM_PROMPT  # noqa: F401  (the verbs' default system turn)
from dreamtune.tasks import competition, gpqa, gsm8k, math500, synthetic
from dreamtune.tasks.common import DATA_ENV, DEFAULT_DATA_DIR, resolve_data_dir
from dreamtune.tasks.synthetic import SYNTHETIC_TASKS, alphabet, grade_synthetic, make_rows

TASKS = {
    "gsm8k": gsm8k,
    "math500": math500,
    "aime24": competition,
    "aime25": competition,
    "amc23": competition,
    "gpqa": gpqa,
    "arithmetic": synthetic,  # synthetic reasoning tasks: bare questions, exact grading
    "sudoku": synthetic,
}
PROMPT_FORMATS = ("chat", "fewshot")

# DEFAULT_SYSTEM_PROMPT (dreamtune.data): the system prompt dreamtune's prepared training data uses by default;
# evaluate a tuned model with the system prompt it was trained with (the dataset manifest records it).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of the correct choice (A, B, C or D) within \\boxed{}."
)
# A base model continuing a few-shot prompt goes on to invent the next exemplar; cut there.
FEWSHOT_STOP = ("\nQuestion:", "<|endoftext|>", "<|im_end|>")
CHAT_STOP = ("<|endoftext|>", "<|im_end|>")


def _module(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    return TASKS[name]


def load(name: str, data_dir=None, limit: int | None = None) -> list[dict]:
    """Rows `{"id", "task", "question", "answer" (str), ...}` of a benchmark's test set.

    `data_dir`: a directory of your benchmark files (`<data_dir>/<name>/test.jsonl`) or a JSONL file;
    None tries the Hugging Face Hub (ValueError suggesting --data-dir on failure; the CLI verbs look
    for local files first, see `resolve_data_dir`). GPQA is only read from a file you supply. `limit`
    keeps the first rows.
    """
    return _module(name).load(name, data_dir=data_dir, limit=limit)


def fewshot_examples(task: str, k: int | None = None, data_dir=None, seed: int = 0) -> list[dict]:
    """k worked exemplars `{question, solution}` for the few-shot format: for GSM8K sampled (seeded)
    from `<data_dir>/gsm8k/train.jsonl` when data_dir is given, otherwise built-in ones. Defaults:
    GSM8K 8, MATH/AIME/AMC 4 (the Dream paper's base settings), GPQA 2."""
    mod = math500 if task == "generic" else _module(task)
    k = mod.FEWSHOT_K if k is None else k
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return mod.fewshot_examples(k, data_dir=data_dir, seed=seed)


def build_prompt(
    row: dict,
    fmt: str,
    *,
    task: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str | None = None,
    shots: list[dict] | None = None,
    k: int | None = None,
):
    """The model input for one row, in an explicit format.

    fmt="chat": a list of messages `[{"role": "system", ...}?, {"role": "user", "content": question +
    "\\n\\n" + instruction}]` for the tokenizer's chat template. The instruction defaults to asking for
    the final answer in \\boxed{} (the choice letter for GPQA); pass instruction="" for the bare question.
    fmt="fewshot": a plain string, no chat template, base-model style: k blocks
    "Question: ...\\nAnswer: <worked solution>" then "Question: <question>\\nAnswer:", separated by blank
    lines. Exemplars come from `shots` (e.g. `fewshot_examples(task, k, data_dir)`) or the built-in ones.
    """
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose 'chat' (chat template) or 'fewshot' (base model)")
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ValueError("build_prompt needs a row with a non-empty 'question' string")
    task = task or row.get("task") or "generic"
    question = row["question"].strip()
    if fmt == "chat":
        if instruction is None:  # a synthetic task's rows were trained as the bare question
            instruction = "" if task in SYNTHETIC_TASKS else CHOICE_INSTRUCTION if task == "gpqa" else BOXED_INSTRUCTION
        content = f"{question}\n\n{instruction}" if instruction else question
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": content}]
    if task in SYNTHETIC_TASKS:
        raise ValueError(f"{task} has no few-shot format: its rows are trained as bare questions; use --prompt-format chat")
    if shots is None:
        shots = fewshot_examples(task, k)
    elif k is not None:
        if k > len(shots):
            raise ValueError(f"k={k} exemplars asked but only {len(shots)} shots given")
        shots = shots[:k]
    blocks = []
    for s in shots:
        if "question" not in s or "solution" not in s:
            raise ValueError("each few-shot exemplar needs 'question' and 'solution'")
        blocks.append(f"Question: {s['question'].strip()}\nAnswer: {s['solution'].strip()}")
    blocks.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(blocks)


def add_benchmark_args(ap) -> None:
    """--data-dir and --prompt-format, with the same help and defaults for eval and compare."""
    ap.add_argument("--data-dir", default=None, help=(
        f"your benchmark files, laid out as DIR/<task>/test.jsonl (e.g. DIR/gsm8k/test.jsonl); default: "
        f"${DATA_ENV}, else ./{DEFAULT_DATA_DIR} when it exists, else the Hugging Face Hub"))
    ap.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS, help=(
        "chat (default): the chat template a tuned model was trained with; fewshot: a base model's few-shot "
        "text. Evaluate base and tuned models in the same format"))


def truncate_response(text: str, fmt: str) -> str:
    """The part of a generation that answers this question: up to the first stop string of the format
    (for few-shot, where the base model begins inventing the next "Question:")."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose 'chat' or 'fewshot'")
    cut = len(text)
    for stop in FEWSHOT_STOP if fmt == "fewshot" else CHAT_STOP:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


__all__ = [
    "TASKS", "PROMPT_FORMATS", "SYNTHETIC_TASKS", "DEFAULT_SYSTEM_PROMPT", "BOXED_INSTRUCTION", "CHOICE_INSTRUCTION",
    "load", "fewshot_examples", "build_prompt", "truncate_response", "make_rows", "grade_synthetic", "alphabet",
    "DATA_ENV", "DEFAULT_DATA_DIR", "resolve_data_dir", "add_benchmark_args",
]
