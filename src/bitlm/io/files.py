"""Small file helpers shared by every reader and writer: JSON objects with clear errors, atomic writes.

Atomic: a file or directory is written under a temporary name beside its destination and renamed into
place only when complete, so a crash, a full disk or a bad tensor never leaves a half-written file where
a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BitlmError


def read_json_object(f: Path, missing_ok: bool = False) -> dict:
    """The JSON object in f ({} if it is missing and missing_ok); a BitlmError naming f otherwise."""
    f = Path(f)
    if not f.is_file():
        if missing_ok:
            return {}
        raise BitlmError(f"{f}: missing")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitlmError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BitlmError(f"{f}: expected a JSON object")
    return d


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path`; on a clean exit it replaces `path`, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_dir_write(dest: Path, write) -> None:
    """write(tmp_dir) fills a temporary sibling, which then replaces dest; dest survives any failure.
    Files of an existing dest that write() does not produce (a README, images) are kept, old weights not."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        if dest.is_dir():
            for f in dest.iterdir():
                stale = f.name.startswith(("model", "pytorch_model")) or f.suffix in (".safetensors", ".bin")
                if f.is_file() and not stale and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
