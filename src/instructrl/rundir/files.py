"""Files of a run: content hashes and stamps of its inputs, and writes and copies that a reader or a
crash never sees half done."""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
from pathlib import Path

from instructrl.data.jsonl import complete_lines, temp_beside


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) of a file, or (relative path, file) of each file in a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [(path.name, path)]
    return [(str(f.relative_to(path)), f) for f in sorted(p for p in path.rglob("*") if p.is_file())]


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file contents (sorted)."""
    digest = hashlib.sha256()
    for name, file in _files(path):
        digest.update(name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def file_stamp(path: Path) -> list:
    """The (name, size, mtime) of a file or of a folder's files: an unchanged stamp spares a re-hash."""
    return [[name, f.stat().st_size, f.stat().st_mtime_ns] for name, f in _files(path)]


def hub_snapshot_changed(name: str, commit: str) -> str | None:
    """The commit of hub name ``name``'s snapshot in the Hugging Face cache now (what loaders read), where
    a file it shares with snapshot ``commit`` differs, or ``commit``'s is no longer cached to compare;
    else None, as where ``name`` is not cached. A commit that changed only files no loader fetched
    (the model card) changes nothing."""
    from instructrl.models.base import hub_snapshot

    now = hub_snapshot(name)
    if now is None or now.name == commit:
        return None
    then = now.parent / commit
    if not then.is_dir():
        return now.name
    for file in then.rglob("*"):
        same = now / file.relative_to(then)
        # the cache links each snapshot's files to blobs named by their content; copies where it cannot link
        if file.is_file() and same.is_file() and file.resolve() != same.resolve() and not filecmp.cmp(file, same, shallow=False):
            return now.name
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader or a crash never sees half of it."""
    tmp = temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` to ``dest``, replacing what was there, never leaving ``dest`` half-written."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    if old.exists():
        shutil.rmtree(old)


def copy_dir(src: Path, dest: Path, copy_function=shutil.copy2) -> None:
    """Copy folder ``src`` to ``dest`` (``copy_function=os.link``: as hard links), replacing what
    was there only once the copy is complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=copy_function)
    replace_dir(tmp, dest)


def trim_step_log(path: Path, resume_step: int, keep_equal: bool) -> None:
    """Keep the lines of a JSONL step log up to ``resume_step``; drop a half-written last line."""
    if not path.is_file():
        return
    kept = [line for line, record in complete_lines(path) if record["step"] < resume_step or (keep_equal and record["step"] == resume_step)]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
