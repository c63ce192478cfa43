"""Worker processes with a hard per-call timeout, for the grader's math-verify stage.

math-verify (sympy underneath) can hang on adversarial input, and signal-based timeouts cannot interrupt
C code, so each call runs in a worker process that is killed and replaced when it runs past its time.
`dreamtune.grading.grade_many` is the user; docs/grading.md ("math-verify in a process pool") says why.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections import deque


def _worker_main(conn, fn) -> None:
    """A pool worker: receives (index, job), answers (index, result, error); None stops it."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" chatter
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    except ValueError:
        pass
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, job = msg
        try:
            conn.send((idx, fn(job), None))
        except Exception as e:  # a bad item must not take the worker down
            conn.send((idx, False, f"{type(e).__name__}: {e}"[:300]))


def _run_pool(fn, jobs: dict[int, object], workers: int, timeout: float, start_timeout: float = 60.0):
    """Run fn(job) for every job in worker processes, each call limited to `timeout` seconds.

    Returns {index: (result, error)}: error is None, "timeout after Ns" (the worker was killed and
    replaced) or the exception text. Uses fork where available (fast start, no re-import of the
    caller's script); the workers only run pure-Python math, so forking a threaded parent is safe here.
    """
    assert workers >= 1 and timeout > 0
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    from multiprocessing.connection import wait

    pending = deque(jobs.items())
    results: dict[int, tuple[object, str | None]] = {}
    live: dict = {}  # conn -> {"proc", "job", "since", "ready"}

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        proc.start()
        child.close()
        live[parent] = {"proc": proc, "job": None, "since": time.monotonic(), "ready": False}

    def retire(conn, grace: float = 0.0):
        st = live.pop(conn)
        st["proc"].join(grace)
        if st["proc"].is_alive():
            st["proc"].kill()
        st["proc"].join(1)
        conn.close()

    start_failures = 0
    for _ in range(min(workers, len(pending))):
        start()
    try:
        while pending or any(st["job"] is not None for st in live.values()):
            now = time.monotonic()
            for conn, st in live.items():
                if st["ready"] and st["job"] is None and pending:
                    st["job"] = pending.popleft()
                    st["since"] = now
                    conn.send(st["job"])
            if not live:
                start()
            limits = [st["since"] + (timeout if st["ready"] else start_timeout) for st in live.values()]
            for conn in wait(list(live), timeout=max(0.0, min(limits) - time.monotonic())):
                st = live[conn]
                try:
                    idx, res, err = conn.recv()
                except (EOFError, OSError):  # the worker died (out of memory, killed by the OS, ...)
                    if not st["ready"]:
                        start_failures += 1
                        if start_failures > 3:
                            raise RuntimeError("grading worker processes die on start; try --workers 0")
                    if st["job"] is not None:
                        results[st["job"][0]] = (False, "grading worker process died")
                    retire(conn)
                    continue
                if idx == "ready":
                    st["ready"] = True
                    continue
                assert st["job"] is not None and idx == st["job"][0]
                results[idx] = (res, err)
                st["job"] = None
            now = time.monotonic()
            for conn, st in list(live.items()):
                if st["job"] is not None and now - st["since"] > timeout:
                    results[st["job"][0]] = (False, f"timeout after {timeout:g}s")
                    retire(conn)  # the only way to stop C-level work in sympy/gmpy
                elif not st["ready"] and now - st["since"] > start_timeout:
                    raise RuntimeError(f"a grading worker did not start within {start_timeout:g}s")
            idle = sum(st["job"] is None for st in live.values())
            while pending and len(live) < workers and idle < len(pending):
                idle += 1
                start()  # replace killed or dead workers
    finally:
        for conn in list(live):
            try:
                conn.send(None)
            except OSError:
                pass
            retire(conn, grace=0.5)
    assert set(results) == set(jobs)
    return results
