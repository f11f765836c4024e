"""Output files: one atomic write, the output names, the manifest / resume state machine, and the
background writer that writes a batch's files while the next batch is explained.

DIR (``--out``) holds ``run.json`` (the settings), ``manifest.jsonl`` (one JSON row per input), the files
the rows name, and ``contact_sheet.png``. A torchrun job writes one ``manifest.rank{R}.jsonl`` per rank,
merged into ``manifest.jsonl`` at the end (or by the next ``--resume``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .options import CLIError

MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{rank}.jsonl"  # one per rank of a torchrun job, merged into MANIFEST at the end
_RANK_MANIFEST_RE = re.compile(r"manifest\.rank(\d+)\.jsonl")
_TEMPORARY_RE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # the temporary names of write_atomic
RUN_CONFIG = "run.json"
CONTACT_SHEET = "contact_sheet.png"
LOCK = ".cfcam.lock"  # held (an OS file lock) by the run writing into DIR
WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))  # PNG encoding releases the GIL
MAX_BATCHES_IN_FLIGHT = 4  # batches explained but not yet written (bounds host memory)


# ---------------------------------------------------------------------------------------------------
# One atomic write.

def write_atomic(path: str | Path, write: Callable, binary: bool = True) -> Path:
    """``write(file)`` into a temporary file next to ``path`` (``.NAME.HEX.tmp``), then ``os.replace``:
    readers never see a partial file, and a killed run leaves only temporary names behind (which
    ``prepare_output`` deletes). The folder is created if needed. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def save_npy(array: np.ndarray, path: Path) -> Path:
    """np.save, atomically."""
    return write_atomic(path, lambda file: np.save(file, array))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda file: file.write(text), binary=False)


def write_file(path: Path, array: np.ndarray) -> None:
    """A CAM (.npy) or an image (.png), atomically."""
    if path.suffix == ".npy":
        save_npy(array, path)
    else:
        from .viz import save_png

        save_png(array, path)


# ---------------------------------------------------------------------------------------------------
# Names.

def output_names(keys: Sequence[str], stems: Sequence[str]) -> list[str]:
    """One output name per input: its stem, unique (case-insensitively) across the run.

    Inputs sharing a stem (``a/cat.png``, ``b/cat.jpg``) get ``stem_HASH``, HASH = the first 8 hex digits
    of the SHA-1 of the input's path relative to the deepest folder the clashing inputs share, so the
    names do not depend on where the data set lives or on the other inputs of the run.
    """
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem.casefold(), []).append(i)
    names = list(stems)
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = [keys[i] for i in members]
        try:
            root = os.path.commonpath(paths)
        except ValueError:  # mixed drives or mixed absolute/relative: hash the whole path
            root = ""
        for i in members:
            relative = Path(os.path.relpath(keys[i], root) if root else keys[i]).as_posix()
            names[i] = f"{stems[i]}_{hashlib.sha1(relative.encode()).hexdigest()[:8]}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # a literal "x_1a2b3c4d" stem clashing with a hashed one
        while name.casefold() in seen:
            name = f"{name}_{i}"
        seen[name.casefold()] = i
        names[i] = name
    return names


# ---------------------------------------------------------------------------------------------------
# Manifests.

def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest.jsonl; a line that is not a JSON object (an interrupted write) is dropped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            rows.append(row)
    return rows


def is_plain_name(name) -> bool:
    """Whether ``name`` names a file directly inside DIR: a non-empty string, not '.' or '..', without a
    folder separator, a drive or a NUL. Manifest rows naming anything else are not trusted."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not os.path.splitdrive(name)[0])


def _row_files_exist(row: dict, out: Path) -> bool:
    files = row.get("files")
    return (isinstance(files, dict) and bool(files)
            and all(is_plain_name(f) and (out / f).is_file() for f in files.values()))


def rank_manifests(out: Path, names: Sequence[str] | None = None) -> list[Path]:
    """DIR's per-rank manifests (``manifest.rank{R}.jsonl``, left by a torchrun job), by rank; ``names``:
    DIR's file names if already listed."""
    if names is None:
        names = os.listdir(out) if out.is_dir() else []
    found = [(int(m.group(1)), name) for name in names if (m := _RANK_MANIFEST_RE.fullmatch(name))]
    return [out / name for _, name in sorted(found)]


def in_order(rows: list[dict], order: Sequence[str] | None) -> list[dict]:
    """``rows`` sorted by their path's place in ``order`` (paths not in it last, as they were)."""
    if order is None:
        return rows
    index = {key: i for i, key in enumerate(order)}
    return sorted(rows, key=lambda row: index.get(row["path"], len(index)))


def gather_manifests(out: Path, order: Sequence[str] | None = None, rank_files: list[Path] | None = None
                     ) -> tuple[list[dict], list[Path], bool]:
    """The rows of DIR's manifest and of any per-rank manifests, one per path (a per-rank row replaces the
    merged one), in ``order`` -> (rows, the per-rank files, whether any file had content)."""
    manifest = out / MANIFEST
    rank_files = rank_manifests(out) if rank_files is None else rank_files
    files = ([manifest] if manifest.is_file() else []) + rank_files
    has_rows = any(path.stat().st_size > 0 for path in files)
    rows: dict[str, dict] = {}
    for path in files:
        for row in read_manifest(path):
            rows.pop(row["path"], None)
            rows[row["path"]] = row
    return in_order(list(rows.values()), order), rank_files, has_rows


def merge_manifests(out: Path, order: Sequence[str] | None = None) -> list[dict]:
    """Fold DIR's per-rank manifests into DIR/manifest.jsonl and sort its rows in ``order`` (atomically),
    then delete the per-rank files; returns the rows. The manifest is rewritten only when there are
    per-rank manifests or its rows are out of order (a resumed run appends its rows at the end)."""
    rows, rank_files, _ = gather_manifests(out, order)
    if rank_files or [row["path"] for row in rows] != [row["path"] for row in read_manifest(out / MANIFEST)]:
        write_text_atomic(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows))
        for path in rank_files:
            path.unlink(missing_ok=True)
    return rows


# ---------------------------------------------------------------------------------------------------
# DIR: one run at a time.

def _try_lock(file) -> None:
    """An exclusive, non-blocking OS lock on ``file`` (OSError when another process holds it). The OS
    drops it when the file is closed or the process ends, however it ends (kill -9 included)."""
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def output_lock(out: Path):
    """``with output_lock(DIR):`` DIR is this run's alone: DIR/.cfcam.lock is locked for the block.
    CLIError when another run holds it. A lock file left by a killed run is not held, so it never blocks."""
    make_output_folder(out)
    try:
        file = open(out / LOCK, "a+b")
    except OSError as error:
        raise CLIError(f"--out: cannot write to {str(out)!r} ({error.strerror or error})") from None
    try:
        try:
            _try_lock(file)
        except OSError:
            raise CLIError(f"--out: {str(out)!r} is in use by another cfcam run (it holds {LOCK}); wait for "
                           "it to finish or pass another --out") from None
        yield
    finally:
        file.close()  # releases the lock


# ---------------------------------------------------------------------------------------------------
# DIR: check, prepare (resume / overwrite).

def check_output_folder(out: Path) -> None:
    """The cheap check, made before any model is loaded and without creating anything: DIR is a folder
    or can be created in a writable folder."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {str(out)!r} exists and is not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out: cannot create {str(out)!r} ({str(existing)!r} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out: cannot write to {str(out)!r} (permission denied)")


def make_output_folder(out: Path) -> None:
    """Create DIR and check that a file can be written in it."""
    check_output_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cfcam-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"--out: cannot write to {str(out)!r} ({error.strerror or error})") from None


def prepare_output(out: Path, resume: bool, overwrite: bool, config: dict,
                   order: Sequence[str] | None = None) -> list[dict]:
    """Create/check DIR; returns the manifest rows to keep (resume) and rewrites the manifest to them.

    The rows of a torchrun job that did not finish (per-rank manifests) count as DIR's: they are merged
    into DIR/manifest.jsonl, kept rows sorted by their path's place in ``order`` (the inputs) if given.
    Temporary files an abruptly killed run left behind are deleted.
    """
    make_output_folder(out)
    manifest = out / MANIFEST
    names = os.listdir(out)  # once: DIR can hold millions of files
    previous, rank_files, has_rows = gather_manifests(out, order, rank_manifests(out, names))
    if overwrite:
        for row in previous:
            files = row.get("files")
            for name in (files.values() if isinstance(files, dict) else ()):
                if is_plain_name(name) and not (out / name).is_dir():
                    (out / name).unlink(missing_ok=True)
        for path in [out / name for name in (MANIFEST, RUN_CONFIG, CONTACT_SHEET)] + rank_files:
            path.unlink(missing_ok=True)
        previous, rank_files, has_rows = [], [], False
    elif has_rows and not resume:
        what = (f"{MANIFEST} is not empty" if manifest.is_file() and manifest.stat().st_size > 0 else
                "the per-rank manifests of an unfinished torchrun job")
        raise CLIError(f"--out: {str(out)!r} already holds a run ({what}); pass --resume to explain only "
                       "the images not done yet, --overwrite to start over, or another --out")
    if resume and (out / RUN_CONFIG).is_file():
        try:
            old = json.loads((out / RUN_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            old = {}
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in config.items()
                   if key in old and old[key] != value]
        if changed:
            raise CLIError(f"--resume: {str(out)!r} was made with other settings ({'; '.join(changed)}); "
                           "rerun with the same options, or pass --overwrite or another --out")
    for name in names:  # a killed run's half-written files (the names write_atomic uses)
        if _TEMPORARY_RE.fullmatch(name) and (out / name).is_file():
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / RUN_CONFIG, json.dumps(config, indent=2) + "\n")
    kept = [row for row in previous if row.get("status") == "ok" and _row_files_exist(row, out)]
    if has_rows or rank_files:  # compact: drop error rows, rows whose files are gone, half-written lines
        write_text_atomic(manifest, "".join(json.dumps(row) + "\n" for row in kept))
        for path in rank_files:
            path.unlink(missing_ok=True)
    return kept


# ---------------------------------------------------------------------------------------------------
# The background writer.

class BatchWriter:
    """``with BatchWriter(manifest_path) as writer: writer.submit(rows, files)`` per batch.

    A batch's files ((path, array) pairs) are written by worker threads while the caller explains the next
    batch; its manifest rows are appended (flushed, fsynced) once all its files are written, batches in
    submission order, so an ok row always names files that exist. At most ``max_in_flight`` batches wait
    (bounded host memory). On an error, Ctrl-C or SIGTERM inside the block the writes under way finish,
    the queued ones are cancelled, and every batch whose files were all written is still committed.
    ``counts`` holds the rows committed by status ("ok" / "error"); ``on_commit(rows)`` is called after
    each batch is committed.
    """

    def __init__(self, manifest_path: Path, on_commit: Callable[[list[dict]], None] | None = None,
                 threads: int = WRITE_THREADS, max_in_flight: int = MAX_BATCHES_IN_FLIGHT):
        self.manifest_path = manifest_path
        self.on_commit = on_commit
        self.threads, self.max_in_flight = threads, max_in_flight
        self.counts = {"ok": 0, "error": 0}
        self._in_flight: deque[tuple[list[dict], list[Future]]] = deque()
        self._manifest = None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BatchWriter:
        self._manifest = open(self.manifest_path, "a", encoding="utf-8")
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="cfcam-write")
        return self

    def submit(self, rows: list[dict], files: Sequence[tuple[Path, np.ndarray]]) -> None:
        """Queue one batch: its rows and the files they name; commits the batches already written."""
        self._in_flight.append((rows, [self._pool.submit(write_file, path, array) for path, array in files]))
        while len(self._in_flight) > self.max_in_flight or (
                self._in_flight and all(f.done() for f in self._in_flight[0][1])):
            self.commit()

    def commit(self) -> list[dict]:
        """Wait for the oldest batch's files, then append its rows to the manifest; returns the rows."""
        rows, futures = self._in_flight.popleft()
        for future in futures:
            future.result()  # re-raises a failed write
        for row in rows:
            self._manifest.write(json.dumps(row) + "\n")
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        for row in rows:
            self.counts["ok" if row["status"] == "ok" else "error"] += 1
        if self.on_commit is not None:
            self.on_commit(rows)
        return rows

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if error is None:
                while self._in_flight:
                    self.commit()
            else:  # let the writes under way finish, then commit every batch whose files were all written
                self._pool.shutdown(wait=True, cancel_futures=True)
                while self._in_flight and all(f.done() and not f.cancelled() and f.exception() is None
                                              for f in self._in_flight[0][1]):
                    try:
                        self.commit()
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        break
        finally:
            self._pool.shutdown(wait=True)
            self._manifest.close()
        return False
