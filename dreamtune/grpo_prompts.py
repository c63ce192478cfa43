"""The prompts and rewards of a GRPO run (dreamtune/grpo.py): grpo.prompts_file read and rendered in
grpo.prompt_format, and each completion graded by the task's own grader.

    rows = load_prompts(cfg, lm)     # [{"ids": prompt token ids, "answer": reference}]
    correct, readable = grade_completions("gsm8k", "chat", responses, answers)
"""

from __future__ import annotations

from pathlib import Path

from dreamtune.monitor import LOG


def read_prompt_rows(cfg) -> list[dict]:
    """Rows {"question", "answer"}: a benchmark's file through its loader, a synthetic task's rows as they are."""
    from dreamtune import tasks
    from dreamtune.data import read_rows

    g = cfg.grpo
    if not Path(g.prompts_file).is_file():
        raise FileNotFoundError(f"grpo.prompts_file '{g.prompts_file}' not found")
    if g.task not in tasks.SYNTHETIC_TASKS:
        return tasks.load(g.task, data_dir=g.prompts_file)
    if g.prompt_format != "sft":
        raise ValueError(f"grpo.task={g.task} rows are rendered as SFT prompts: set grpo.prompt_format=sft")
    rows = read_rows(g.prompts_file)
    missing = [k for k in (cfg.data.prompt_key, "answer") if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{g.prompts_file} rows need a '{missing[0]}' column for grpo.task={g.task}")
    return [{"question": r[cfg.data.prompt_key], "answer": str(r["answer"])} for r in rows]


def check_prompt_source(cfg) -> int:
    """What `--dry-run` checks without a tokenizer: the file reads as the task's rows. Returns their count."""
    return len(read_prompt_rows(cfg))


def load_prompts(cfg, lm) -> list[dict]:
    """Rows {"ids": prompt token ids, "answer": reference} from grpo.prompts_file in grpo.prompt_format."""
    from dreamtune import tasks
    from dreamtune.data import encode_example
    from dreamtune.engine import encode_prompt

    g = cfg.grpo
    rows = read_prompt_rows(cfg)
    out = []
    for r in rows:
        if g.prompt_format == "sft":  # as `dreamtune train` renders the prompts of SFT rows
            ids = encode_example(lm.tokenizer, r["question"], "")[0]
        else:
            ids = encode_prompt(lm.tokenizer, tasks.build_prompt(r, g.prompt_format, task=g.task))
        if len(ids) <= g.max_prompt_length:
            out.append({"ids": ids, "answer": r["answer"]})
    if len(out) < len(rows):
        LOG.info(f"grpo: dropped {len(rows) - len(out)} of {len(rows)} prompts longer than grpo.max_prompt_length={g.max_prompt_length}")
    return out


def grade_completions(task: str, fmt: str, responses: list[str], answers: list[str]) -> tuple[list[bool], list[bool]]:
    """(correct, states an answer the grader can read) per response: the task's own grader."""
    from dreamtune import tasks

    if task in tasks.SYNTHETIC_TASKS:
        from dreamtune.tasks.synthetic import final_answer

        return ([tasks.grade_synthetic(task, r, a) for r, a in zip(responses, answers)],
                [final_answer(r) is not None for r in responses])
    from dreamtune.grading import grade_many

    texts = [tasks.truncate_response(r, "fewshot" if fmt == "fewshot" else "chat") for r in responses]
    verdicts = grade_many([{"response": t, "answer": a} for t, a in zip(texts, answers)], task=task)
    return [bool(v["correct"]) for v in verdicts], [v["extracted"] is not None for v in verdicts]
