"""The `dreamtune <verb>` command line: a thin dispatch over a plain dict of verbs.

Each verb names a module and a function `main(argv: list[str]) -> int`; the module is imported only
when its verb runs, so `dreamtune doctor` works without the optional extras installed.

User mistakes (ValueError, FileNotFoundError, a missing optional package, a path that cannot be written
such as a read-only filesystem) print one line starting with `error:` and exit 2, with no traceback; a
failure the user can act on that is not a mistake in the input (RunError: a full disk while saving a
checkpoint; a full disk while writing any output) prints one line and exits 1. Set DREAMTUNE_DEBUG=1 to
see the traceback anyway.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# verb -> (module, function, one-line help)
VERBS = {
    "doctor": ("dreamtune.doctor", "main", "check the environment (python, torch, CUDA, GPUs, disk, extras)"),
    "data": ("dreamtune.data_cli", "main", "download | prepare | validate a dataset"),
    "train": ("dreamtune.train", "main", "masked-diffusion SFT (also: python -m / torchrun -m dreamtune.train)"),
    "generate": ("dreamtune.generate_cli", "main", "generate text from a prompt or a JSONL file of prompts"),
    "eval": ("dreamtune.evaluate", "main", "evaluate a model on math benchmarks -> results/eval_results.json"),
    "grade": ("dreamtune.grade_cli", "main", "grade generations made elsewhere (JSONL with response, answer)"),
    "compare": ("dreamtune.compare", "main", "base vs tuned, side by side, same decoding settings"),
    "export": ("dreamtune.export_cli", "main", "export a checkpoint as an HF or Dream-format directory"),
    "quickstart": ("dreamtune.quickstart", "main", "the whole journey on a tiny model on CPU, in minutes"),
    "report": ("dreamtune.report", "main", "figures, results table and examples from a run's artifacts"),
    "demo": ("dreamtune.demo", "main", "web demo: watch an answer being denoised"),
}


class RunError(Exception):
    """A failure outside the user's input that the user can act on (a full disk, an I/O error while saving),
    with its numbers and what to do: printed as one `error:` line, exit 1."""


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: dreamtune <verb> [options]   (dreamtune <verb> --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, _, help_) in VERBS.items()]
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes raise ValueError, so the CLI prints one `error:` line (exit 2); subparsers made
    from it (add_subparsers) are of this class too."""

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """The parser every verb uses (one `error:` line instead of argparse's usage block)."""
    return OneLineParser(prog=prog, description=description, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (checked before any model is loaded)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fail(message: str, code: int = 2) -> int:
    """Print one clear line to stderr and return the exit code (for `return fail(...)`)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def run_main(fn, argv: list[str]) -> int:
    """Run a verb's main, turning user mistakes into one line and a non-zero exit."""
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except RunError as e:
        if os.environ.get("DREAMTUNE_DEBUG"):
            raise
        return fail(str(e).strip().splitlines()[0], 1)
    except (ValueError, OSError, ModuleNotFoundError, MemoryError, FloatingPointError) as e:
        if os.environ.get("DREAMTUNE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # not a mistake: exit 1, as RunError
            where = f" while writing {e.filename}" if e.filename is not None else ""
            return fail(f"the disk is full (No space left on device){where}; free some space or "
                        f"choose a path on another disk, then run the command again", 1)
        if isinstance(e, OSError) and e.filename is not None:  # the system's own words, and what to do
            what = "a file is in the way of a directory" if isinstance(e, FileExistsError) else e.strerror
            msg = f"{what}: {e.filename}; choose another path"
        if isinstance(e, ModuleNotFoundError):
            msg = f"{msg}; install the optional extras with: pip install 'dreamtune[all]'"
        return fail(msg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dreamtune import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return fail(f"unknown verb '{verb}'{hint}; run 'dreamtune --help' for the list")
    module, func, _ = VERBS[verb]
    fn = getattr(importlib.import_module(module), func)
    return run_main(fn, rest)


if __name__ == "__main__":
    # `python -m dreamtune.cli`: run the imported module's main, so that the RunError the verbs raise (imported
    # from dreamtune.cli) is the class run_main catches, not this __main__ module's copy of it
    from dreamtune.cli import main as _main

    sys.exit(_main())
