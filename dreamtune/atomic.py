"""Whole-or-nothing outputs: every file is written under a temporary name beside its target and renamed
into place, and finished directories are renamed in whole. No torch import, so leaves such as the report
can use it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path) -> None:
    """Fail now, in one clear line, if `path` could not be written later (a file where a directory of
    the path should be, a directory at the path, or no permission), before any work is done for it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; name a file")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot write {path}: {parent} is not writable; choose another path")
            return


def io_error(e: BaseException, path: str | Path, tmp: str | Path | None = None) -> OSError | None:
    """A failed write of `path` as an OSError naming `path` (not the temporary name `tmp` it was written
    under), with the system's words for its error number, e.g. "No space left on device"; also for a
    library's own error that carries the number (safetensors: "... (os error 28)"). None when `e` is no I/O
    failure of this write (an OSError naming a file outside `tmp` is another file's)."""
    named = getattr(e, "filename", None) if isinstance(e, OSError) else None
    if tmp is not None and named is not None and not str(named).startswith(str(tmp)):
        return None
    code = e.errno if isinstance(e, OSError) else None
    if code is None and not isinstance(e, OSError):
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else None
    return OSError(code, os.strerror(code), str(path)) if code else None


def write_file(path: str | Path, write) -> None:
    """Call write(tmp_path) for a temporary name beside `path` (same suffix), then rename into place. An
    I/O failure (a full disk, a read-only filesystem) leaves nothing behind and is raised as an OSError
    naming `path` (io_error)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    except (FileExistsError, NotADirectoryError):  # a file where a directory of the path should be
        raise NotADirectoryError(f"cannot write {path}: a file is in the way of its directory; choose another path") from None
    except PermissionError:
        raise PermissionError(f"cannot write {path}: permission denied; choose another path") from None
    except OSError as e:  # a read-only filesystem, a full disk
        raise (io_error(e, path) or e) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the result should look like any new file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = io_error(e, path, tmp)
        if error is None:
            raise
        raise error from e


def write_text(path: str | Path, text: str) -> None:
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def temp_dir_beside(out: Path) -> Path:
    """A new empty directory beside `out` (its parents made), with a new directory's usual mode, for a
    result that is renamed into place (replace_dir) once whole."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except (FileExistsError, NotADirectoryError):  # a file where a directory of the path should be: the OS names it
        raise
    except OSError as e:  # a read-only filesystem, a full disk: named as `out`, not its temporary name
        raise (io_error(e, out) or e) from None
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the result should look like any mkdir
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing `out` is replaced only after `tmp` is whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
