"""Small file-system helpers shared by conversion, checkpoints, datastores and the CLI.

* `move_into_place(tmp, out)`: publish a finished temporary sibling directory atomically,
  replacing an existing `out` only once the new one is complete (the old one is restored if the
  final rename fails).
* `apply_umask(dir)`: give a `mkdtemp` directory (0700) and its files umask-based permissions.
* `iter_jsonl(path, what)`: (line number, object) per non-blank line, with one-line errors that
  name the file and line (`what` names the file's role in the message).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxspec.errors import InputError


def apply_umask(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.iterdir():
        os.chmod(child, 0o666 & ~umask)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
    os.replace(out_dir, old / "dir")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "dir", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def iter_jsonl(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read {what} ({e.__class__.__name__}: {e})") from None
