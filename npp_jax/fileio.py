"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one,
never a partial one. Local paths and gs:// alike (etils.epath)."""
from __future__ import annotations

import json
from typing import Any, BinaryIO, Callable
import uuid

from etils import epath


def write_atomic(path: epath.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """Calls write(f) on a uniquely named temporary file beside `path`, then renames it over
  `path` (replacing it). A failed write removes the temporary file and leaves `path` as it was."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    with tmp.open("wb") as f:
      write(f)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  tmp.replace(path)


def write_json_atomic(path: epath.PathLike, obj: Any, *, indent: int = 1, **dumps_kwargs) -> None:
  """`obj` as JSON at `path`, atomically; creates the parent directory."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(obj, indent=indent, **dumps_kwargs)
  write_atomic(path, lambda f: f.write(text.encode()))
