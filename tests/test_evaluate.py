"""`dreamtune eval`, `compare` and `generate` end to end on a tiny random model, plus the pure pieces
(merge of rank parts, sharding, config checks) and the one-line CLI errors.

Run: python -m pytest tests/test_evaluate.py -q   (uses ../shared/data/eval; skips without it)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dreamtune.evaluate as evaluate
from dreamtune.cli import main as cli
from dreamtune.export import save_hf
from dreamtune.tiny import tiny_lm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EVAL = DATA / "eval"
TASKS = "gsm8k,math500,aime24,aime25,amc23"
needs_data = pytest.mark.skipif(not (EVAL / "gsm8k" / "test.jsonl").is_file(),
                                reason=f"benchmark files not found at {EVAL} (the shared data directory beside the repo)")
FAST = ["--max-new-tokens", "16", "--steps", "4", "--grade-workers", "0", "--batch-size", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_hf(tiny_lm(seed=3), tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def model_dir2(tmp_path_factory):
    return str(save_hf(tiny_lm(seed=4), tmp_path_factory.mktemp("m") / "tiny2"))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def atomic_umask() -> int:
    from dreamtune.atomic import umask

    return umask()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --------------------------------------------------------------------------------------- eval


@needs_data
def test_eval_end_to_end(model_dir, tmp_path):
    out = tmp_path / "results" / "eval_results.json"
    rc = cli(["eval", "--model", model_dir, "--tasks", TASKS, "--data-dir", str(EVAL), "--limit", "5",
              "--prompt-format", "chat", "--out", str(out), *FAST])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert set(summary["tasks"]) == set(TASKS.split(","))
    for s in summary["tasks"].values():
        assert s["total"] == 5 and 0 <= s["correct"] <= 5 and set(s["by_stage"]) >= {"exact", "none"}
    d = summary["decoding"]
    assert (d["alg"], d["steps"], d["max_new_tokens"], d["temperature"]) == ("entropy", 4, 16, 0.2)
    assert not set(d) & {"threshold", "block_length", "tokens_per_step", "use_cache", "dual_cache"}  # fast's only
    assert summary["model"] == str(Path(model_dir).resolve()) and summary["prompt_format"] == "chat"
    assert summary["time_s"] > 0 and summary["seed"] == 0 and summary["created"]
    rows = read_jsonl(out.with_name("eval_results.samples.jsonl"))
    assert len(rows) == 25 and len({(r["task"], r["id"]) for r in rows}) == 25
    for r in rows:
        assert {"task", "id", "question", "prompt", "response", "answer", "extracted", "correct", "stage"} <= set(r)
        assert r["prompt"].endswith("<|im_start|>assistant\n")
    assert [r["task"] for r in rows[::5]] == TASKS.split(",")  # merged in task order
    assert not list(out.parent.glob("*.part-*"))  # parts merged and removed


@needs_data
def test_eval_fewshot(model_dir, tmp_path):
    out = tmp_path / "few.json"
    assert cli(["eval", "--model", model_dir, "--tasks", "gsm8k", "--data-dir", str(EVAL), "--limit", "2",
                "--prompt-format", "fewshot", "--shots", "1", "--alg", "fast", "--out", str(out), *FAST]) == 0
    rows = read_jsonl(tmp_path / "few.samples.jsonl")
    assert len(rows) == 2 and rows[0]["prompt"].count("Question:") == 2
    d = json.loads(out.read_text())["decoding"]
    assert d["sampler"] == "fast" and {"threshold", "block_length", "use_cache", "dual_cache"} <= set(d)
    assert not set(d) & {"steps", "eps", "alg_temp"}  # Dream's sampler's only


@needs_data
def test_eval_resume_skips_done_rows(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval_results.json"
    args = ["eval", "--model", model_dir, "--tasks", "gsm8k,aime25", "--data-dir", str(EVAL),
            "--prompt-format", "chat", "--out", str(out), *FAST]
    assert cli(args + ["--limit", "2"]) == 0
    first = read_jsonl(tmp_path / "eval_results.samples.jsonl")

    generated = []
    real = evaluate.generate_batches

    def counting(lm, prompts, *a, **kw):
        generated.append(len(prompts))
        return real(lm, prompts, *a, **kw)

    monkeypatch.setattr(evaluate, "generate_batches", counting)
    assert cli(args + ["--limit", "3"]) == 0  # one new problem per task
    assert generated == [1, 1]
    rows = read_jsonl(tmp_path / "eval_results.samples.jsonl")
    assert len(rows) == 6
    assert [r for r in rows if r["id"] in ("0", "1")] == first  # earlier rows kept as they were

    # a run killed mid-way: its rows live only in a part file (the last line torn); resume uses them
    samples = tmp_path / "eval_results.samples.jsonl"
    part = tmp_path / "eval_results.samples.part-0.jsonl"
    whole = [r for r in rows if r["id"] != "2"]
    part.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"task": "gsm8k", "id": "2", "que')
    samples.unlink()
    generated.clear()
    assert cli(args + ["--limit", "3"]) == 0
    assert generated == [1, 1]  # gsm8k/2 (torn) and aime25/2 again; the four whole rows are reused
    assert len(read_jsonl(samples)) == 6 and not part.exists()

    generated.clear()
    assert cli(args + ["--limit", "3"]) == 0  # everything done: no model run at all
    assert generated == []


@needs_data
def test_eval_refuses_a_different_configuration(model_dir, tmp_path, capsys):
    out = tmp_path / "eval_results.json"
    args = ["eval", "--model", model_dir, "--tasks", "amc23", "--data-dir", str(EVAL), "--limit", "1",
            "--prompt-format", "chat", "--out", str(out), *FAST]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(args + ["--temperature", "0.5"]) == 2
    assert "different configuration" in one_error_line(capsys)


def test_merge_samples_and_shard():
    order = [("gsm8k", "0"), ("gsm8k", "1"), ("gsm8k", "2"), ("amc23", "0"), ("amc23", "1")]
    existing = [{"task": "gsm8k", "id": "1", "v": "old"}, {"task": "math500", "id": "9", "v": "extra"}]
    part0 = [{"task": "gsm8k", "id": "0", "v": "p0"}, {"task": "gsm8k", "id": "2", "v": "p0"}]
    part1 = [{"task": "amc23", "id": "1", "v": "p1"}, {"task": "gsm8k", "id": "1", "v": "dup"},
             {"task": "amc23", "id": "0", "v": "p1"}]
    merged = evaluate.merge_samples([existing, part0, part1], order)
    assert [(r["task"], r["id"]) for r in merged] == order + [("math500", "9")]
    assert [r["v"] for r in merged] == ["p0", "old", "p0", "p1", "p1", "extra"]
    assert evaluate.merge_samples([], order) == []

    items = list(range(10))
    shards = [evaluate.shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items


def test_config_check_and_torn_lines(tmp_path):
    evaluate.check_config([{"config_id": "a"}], "a", "f")
    with pytest.raises(ValueError, match="different configuration"):
        evaluate.check_config([{"config_id": "a"}, {"config_id": "b"}], "a", "f")
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    assert evaluate.read_samples(p) == [{"a": 1}, {"a": 2}]
    evaluate.repair_tail(p)
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="damaged"):
        evaluate.read_samples(p)


def test_jsonl_rows_may_hold_line_separators(tmp_path):
    """JSON lines as dreamtune writes them (ensure_ascii=False) keep U+2028 and U+0085 in strings unescaped: a
    response holding one is one row, in the samples file (resume) and in a prompts file alike."""
    from dreamtune.generate_cli import read_prompt_rows

    rows = [{"response": "a\u2028b\u0085c", "id": 1}, {"response": "d", "id": 2}]
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert evaluate.read_samples(p) == rows
    p.write_text("".join(json.dumps({"prompt": r["response"]}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r["prompt"] for r in read_prompt_rows(p)] == ["a\u2028b\u0085c", "d"]


# --------------------------------------------------------------------------------------- local benchmark files


def write_bench(root: Path, n: int = 2) -> Path:
    """root/gsm8k/test.jsonl in GSM8K's own format, made up here (n rows)."""
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 1} = {2 * i + 1} apples.\n#### {2 * i + 1}"} for i in range(1, n + 1)]
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_eval_and_compare_find_local_files_and_share_defaults(model_dir, tmp_path, monkeypatch, capsys):
    """No --data-dir, no --prompt-format: both verbs read ./data/eval, then $DREAMTUNE_EVAL_DATA, in chat."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DREAMTUNE_EVAL_DATA", raising=False)
    write_bench(tmp_path / "data" / "eval", n=2)
    assert cli(["eval", "--model", model_dir, "--tasks", "gsm8k", "--out", "results/eval_results.json", *FAST]) == 0
    summary = json.loads((tmp_path / "results" / "eval_results.json").read_text())
    assert summary["data_dir"] == str(Path("data") / "eval") and summary["prompt_format"] == "chat"
    assert summary["tasks"]["gsm8k"]["total"] == 2
    assert cli(["compare", "--base", model_dir, "--tuned", model_dir, "--task", "gsm8k", "--n", "5",
                "--max-new-tokens", "8", "--out", "results/compare.json"]) == 0
    cmp = json.loads((tmp_path / "results" / "compare.json").read_text())
    assert cmp["prompt_format"] == "chat" and [r["answer"] for r in cmp["rows"]] == ["3", "5"]
    assert "benchmark files: data/eval (from the default folder ./data/eval)" in capsys.readouterr().err

    mine = write_bench(tmp_path / "elsewhere", n=3)  # the setting wins over the default folder
    monkeypatch.setenv("DREAMTUNE_EVAL_DATA", str(mine))
    assert cli(["compare", "--base", model_dir, "--tuned", model_dir, "--task", "gsm8k", "--n", "5",
                "--max-new-tokens", "8", "--out", "results/c2.json"]) == 0
    assert len(json.loads((tmp_path / "results" / "c2.json").read_text())["rows"]) == 3
    err = capsys.readouterr().err  # compare's progress bar: both models' answers, with the time left
    assert "compare base" in err and "compare tuned" in err and "6/6" in err and "<" in err
    monkeypatch.setenv("DREAMTUNE_EVAL_DATA", str(tmp_path / "typo"))
    assert cli(["eval", "--model", model_dir, "--tasks", "gsm8k", "--out", "results/e2.json", *FAST]) == 2
    assert "DREAMTUNE_EVAL_DATA" in one_error_line(capsys) and not (tmp_path / "results" / "e2.json").exists()


@pytest.mark.parametrize("argv", [["eval"], ["compare"], ["generate"], ["grade"], ["report"], ["export"], ["demo"],
                                  ["quickstart"], ["doctor"], ["data", "download"], ["data", "prepare"],
                                  ["data", "validate"]])
def test_help_names_no_path_outside_the_repository(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "../" not in text and "shared/" not in text


# --------------------------------------------------------------------------------------- compare, generate


@needs_data
def test_compare_task_writes_json(model_dir, model_dir2, tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert cli(["compare", "--base", model_dir, "--tuned", model_dir2, "--task", "gsm8k", "--n", "2",
                "--data-dir", str(EVAL), "--max-new-tokens", "16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["base"] == model_dir and res["tuned"] == model_dir2 and res["decoding"]["max_new_tokens"] == 16
    assert len(res["rows"]) == 2
    for row in res["rows"]:
        assert {"prompt", "answer", "base", "tuned", "base_correct", "tuned_correct"} <= set(row)
    assert set(res["summary"]) == {"base_accuracy", "tuned_accuracy"}
    assert "BASE" in capsys.readouterr().out


def test_compare_prompts_file_same_model_same_text(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 1+1?\nName a colour.\n")
    out = tmp_path / "c.json"
    assert cli(["compare", "--base", model_dir, "--tuned", model_dir, "--prompts", str(prompts), "--chat",
                "--max-new-tokens", "12", "--temperature", "0.8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"] == {} and len(res["rows"]) == 2
    assert all(r["base"] == r["tuned"] for r in res["rows"])  # same settings, same seed: same text


def test_generate_cli(model_dir, tmp_path, capsys):
    assert cli(["generate", "--model", model_dir, "Hello", "--max-new-tokens", "16", "--json", "--seed", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["decoding"]["max_new_tokens"] == 16 and res["tokens_per_s"] > 0 and res["nfe"] >= 1
    assert "steps" in res["decoding"] and "threshold" not in res["decoding"]
    assert cli(["generate", "--model", model_dir, "Hello", "--max-new-tokens", "16", "--json", "--alg", "fast"]) == 0
    fast = json.loads(capsys.readouterr().out)["decoding"]
    assert "threshold" in fast and "steps" not in fast and "eps" not in fast
    assert cli(["generate", "--model", model_dir, "Hello", "--max-new-tokens", "16", "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert cap.out.rstrip("\n") == res["response"] and "tokens/s" in cap.err

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "k": 1}\n{"messages": [{"role": "user", "content": "bc"}]}\n'
                   '{"prompt": [{"role": "user", "content": "a longer one"}]}\n')
    dst = tmp_path / "out" / "o.jsonl"
    assert cli(["generate", "--model", model_dir, "--input", str(src), "--output", str(dst), "--batch-size", "2",
                "--alg", "fast", "--max-new-tokens", "8"]) == 0
    rows = read_jsonl(dst)
    assert len(rows) == 3 and rows[0]["k"] == 1 and all("response" in r for r in rows)


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--model", "/nonexistent/model", "--tasks", "gsm8k", "--prompt-format", "chat"], "does not exist"),
    (["eval", "--model", "MODEL", "--tasks", "gsm8k,bogus", "--prompt-format", "chat"], "unknown task 'bogus'"),
    (["eval", "--model", "MODEL", "--tasks", "gsm8k", "--data-dir", "TMP/no-such-folder"], "does not exist"),
    (["eval", "--model", "MODEL", "--prompt-format", "chat", "--alg", "nope"], "invalid choice"),
    (["generate", "--model", "/nonexistent/model", "hi"], "does not exist"),
    (["generate", "--model", "MODEL", "hi", "--bogus-flag"], "unrecognized arguments"),
    (["generate", "--model", "MODEL", "hi", "--top-p", "2"], "top_p"),
    (["generate", "--model", "MODEL"], "either a prompt or --input"),
    (["compare", "--base", "/nonexistent/a", "--tuned", "MODEL", "--prompts", "PROMPTS"], "does not exist"),
    (["compare", "--base", "MODEL", "--tuned", "/nonexistent/b", "--prompts", "PROMPTS"], "--tuned: model directory"),
    (["compare", "--base", "MODEL", "--tuned", "MODEL"], "--prompts FILE or --task"),
    (["generate", "--model", "MODEL", "--input", "PROMPTS", "--output", "o.jsonl", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "MODEL", "--tasks", "gsm8k", "--prompt-format", "chat", "--batch-size", "0"], "--batch-size"),
    (["generate", "--model", "MODEL", "--input", "TMP/p.jsonl", "--output", "TMP/afile/o.jsonl", "--max-new-tokens", "4"],
     "is a file"),
    (["grade", "--task", "nope", "--predictions", "PROMPTS"], "invalid choice"),
    (["doctor", "--bogus"], "unrecognized arguments"),
    (["export", "MODEL", "--format", "bogus", "--out", "x"], "invalid choice"),
    (["export", "MODEL", "--out", "TMP/afile"], "is a file"),
    (["export", "MODEL", "--out", "TMP/afile/x"], "in the way"),
    (["export", "MODEL", "--out", "TMP/full"], "--overwrite"),
    (["generate", "--model", "MODEL", "--input", "TMP/full", "--output", "TMP/o.jsonl"], "prompts file 'TMP/full' is a directory"),
    (["generate", "--model", "MODEL", "--input", "TMP/bytes.jsonl", "--output", "TMP/o.jsonl"], "is not UTF-8 text"),
    (["generate", "--model", "MODEL", "--input", "TMP/bad.jsonl", "--output", "TMP/o.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["generate", "--model", "MODEL", "--input", "TMP/list.jsonl", "--output", "TMP/o.jsonl"],
     "list.jsonl:2: expected a JSON object with a 'prompt' or 'messages' field, got a JSON list"),
    (["generate", "--model", "MODEL", "--input", "TMP/noprompt.jsonl", "--output", "TMP/o.jsonl"],
     "noprompt.jsonl:2: row has no 'prompt' or 'messages' field"),
    (["compare", "--base", "MODEL", "--tuned", "MODEL", "--prompts", "TMP/bytes.txt"], "prompts file 'TMP/bytes.txt' is not UTF-8"),
    (["generate", "--model", "TMP/short", "hi"], "TMP/short/model.safetensors is cut short"),
    (["eval", "--model", "TMP/short", "--tasks", "gsm8k", "--data-dir", "TMP/bench"], "TMP/short/model.safetensors is cut short"),
    (["export", "TMP/short", "--out", "TMP/x"], "TMP/short/model.safetensors is cut short"),
    (["compare", "--base", "MODEL", "--tuned", "TMP/short", "--prompts", "PROMPTS", "--out", "TMP/x"],
     "--tuned: TMP/short/model.safetensors is cut short"),  # before the base model generates
])
def test_cli_errors_are_one_line_exit_2(model_dir, tmp_path, capsys, argv, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "afile").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "bytes.jsonl").write_bytes(b"\xff\xfe{}\n")
    for name, second in [("bad", '{"prompt": '), ("list", '["hi"]'), ("noprompt", '{"text": "hi"}')]:
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "hi"}\n' + second + "\n")
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfehi\n")
    (tmp_path / "bench" / "gsm8k").mkdir(parents=True)
    (tmp_path / "bench" / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "so\\n#### 2"}\n')
    if "TMP/short" in argv:  # a model whose weights a download or save left cut short
        import shutil

        shutil.copytree(model_dir, tmp_path / "short")
        weights = tmp_path / "short" / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    argv, needle = ([a.replace("MODEL", model_dir).replace("PROMPTS", str(prompts)).replace("TMP", str(tmp_path)) for a in argv],
                    needle.replace("TMP", str(tmp_path)))
    capsys.readouterr()
    assert cli(argv) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "o.jsonl").exists()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("*.tmp-*"))


def no_room_for(monkeypatch, module, name: str, error):
    """module.name fails as it does on a full disk (it raises `error`)."""
    def full(*a, **kw):
        raise error

    monkeypatch.setattr(module, name, full)


def last_error_line(capsys) -> str:
    """The one error line after a verb's progress bars (export's shard writer, generate's prompts): no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    """export: the safetensors writer's own error for a full disk ("... (os error 28)"); generate --output: the
    OS's. Each is one line naming the output, exit 1, and nothing is left where the output would go."""
    import errno

    import transformers.modeling_utils as MU
    from safetensors import SafetensorError

    out = tmp_path / "exported"
    no_room_for(monkeypatch, MU, "safe_save_file",
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    capsys.readouterr()
    assert cli(["export", model_dir, "--out", str(out)]) == 1
    line = last_error_line(capsys)
    assert line == (f"error: the disk is full (No space left on device) while writing {out}; free some space or choose "
                    f"a path on another disk, then run the command again"), line
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    real = Path.write_text

    def write_text(self, *a, **kw):
        if ".tmp-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    dst = tmp_path / "answers.jsonl"
    assert cli(["generate", "--model", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output", str(dst),
                "--max-new-tokens", "4", "--steps", "2"]) == 1
    line = last_error_line(capsys)
    assert line.startswith(f"error: the disk is full (No space left on device) while writing {dst};"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_eval_on_a_full_disk_names_its_resume_file_and_the_error_has_its_own_line(model_dir, tmp_path, capsys, monkeypatch):
    """The disk fills while eval appends a finished batch: one line naming the file (the progress bar closed
    first, so the error starts a line), exit 1; a rerun with room resumes from that file."""
    import errno

    (tmp_path / "bench" / "gsm8k").mkdir(parents=True)
    (tmp_path / "bench" / "gsm8k" / "test.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": f"so\n#### {i + 1}"}) + "\n" for i in range(4)))
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", "--model", model_dir, "--tasks", "gsm8k", "--data-dir", str(tmp_path / "bench"), "--out", str(out),
            "--max-new-tokens", "4", "--steps", "2", "--batch-size", "2", "--grade-workers", "0"]
    real = Path.open

    def open_(self, mode="r", *a, **kw):
        if mode == "a" and ".samples.part-" in self.name and self.exists() and self.stat().st_size:
            raise OSError(errno.ENOSPC, "No space left on device")  # room for the first batch only
        return real(self, mode, *a, **kw)

    monkeypatch.setattr(Path, "open", open_)
    capsys.readouterr()
    assert cli(argv) == 1
    err = capsys.readouterr().err
    part = evaluate.part_path(out, 0)
    assert "Traceback" not in err and f"\nerror: the disk is full (No space left on device) while writing {part};" in err, err
    assert not out.exists() and len(read_jsonl(part)) == 2
    monkeypatch.undo()
    assert cli(argv) == 0 and len(read_jsonl(out.with_name("eval.samples.jsonl"))) == 4


def test_export_overwrite_replaces_whole_and_keeps_usual_modes(model_dir, tmp_path, capsys):
    """--overwrite replaces an existing export; the new directory has a new directory's mode, not 0700."""
    out = tmp_path / "exported"
    assert cli(["export", model_dir, "--out", str(out)]) == 0
    assert cli(["export", model_dir, "--out", str(out), "--format", "dream", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "Dream"
    assert out.stat().st_mode & 0o777 == 0o777 & ~atomic_umask()
