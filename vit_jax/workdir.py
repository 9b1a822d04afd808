"""Workdir files through ``etils.epath``: a local folder and cloud storage (``gs://...``, the norm on TPU pods) alike.

    root = workdir.path('gs://bucket/run')        # local paths made absolute, URLs kept
    workdir.write_atomic(root / 'DONE', text)      # readers never see half a file
    workdir.append_line(root / 'metrics.jsonl', line)

No ``os.path`` / ``open`` / ``os.listdir`` on workdir paths: they cannot reach a bucket. Orbax takes the same paths.
"""

from __future__ import annotations

import os

from etils import epath


def path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: a URL (``gs://``, ``s3://``) as it is, a local path made absolute."""
    text = os.fspath(workdir)
    return epath.Path(text if '://' in text else os.path.abspath(text))


def is_local(p: epath.Path) -> bool:
    return '://' not in os.fspath(p)


def read_text(p: epath.Path) -> str | None:
    """The file's text, or None where it does not exist."""
    return p.read_text() if p.exists() else None


def write_atomic(p: epath.Path, text: str) -> None:
    """Writes ``text`` so that readers see the old file or the new one: a temporary file renamed locally; on cloud
    storage an object upload is atomic already (and renames are copies)."""
    if not is_local(p):
        p.write_text(text)
        return
    tmp = p.parent / (p.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(p)


def append_line(p: epath.Path, line: str) -> None:
    """Appends one line; cloud objects cannot be appended to, so there the file is written again whole."""
    if is_local(p):
        with p.open('a') as f:
            f.write(line + '\n')
    else:
        write_atomic(p, (read_text(p) or '') + line + '\n')
