"""Checkpoint files of the runner: written atomically, read with a check of what run they belong to.

A checkpoint carries a *key*: everything that determines its run (the method, its hyperparameters,
and whatever the caller adds: data, forget set, seed, model, training settings). A run resumes from
a checkpoint only when the keys are equal; otherwise :func:`read` refuses it and names the entries
that differ, so that a folder written for one experiment is never silently reused by another.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import torch

VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a runner checkpoint, or of another run.

    ``path`` is the file; ``differences`` lists ``(entry, in the file, in this run)`` for a checkpoint of
    another run (empty otherwise).
    """

    def __init__(self, message: str, path: str, differences=()):
        super().__init__(message)
        self.path = path
        self.differences = list(differences)


def digest(*arrays) -> str:
    """A short content digest (SHA-256, 16 hex digits) of tensors, arrays, strings or bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        if torch.is_tensor(a):
            a = a.detach().cpu().contiguous().numpy()
        if isinstance(a, np.ndarray):
            h.update(f"{a.dtype}{a.shape}".encode())
            a = np.ascontiguousarray(a).tobytes()
        elif isinstance(a, str):
            a = a.encode()
        h.update(len(a).to_bytes(8, "little"))
        h.update(a)
    return h.hexdigest()[:16]


def run_key(method, extra: dict | None = None) -> dict:
    """The key of a run of ``method``: its name and hyperparameters, and the caller's ``extra`` entries."""
    return {"method": method.name, "hparams": method.hparams_for_checkpoint(), **(extra or {})}


def _flatten(key, prefix=""):
    out = {}
    for k, v in key.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


class _Absent:
    def __repr__(self):
        return "absent"


ABSENT = _Absent()  # an entry one of two keys does not have


def differences(saved: dict, mine: dict) -> list[tuple[str, object, object]]:
    """``(entry, saved value, my value)`` for every dotted entry of two nested keys that differs, in the
    order of ``mine`` (then entries only ``saved`` has); a missing entry is :data:`ABSENT`."""
    a, b = _flatten(saved), _flatten(mine)
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in list(b) + [k for k in a if k not in b]
            if a.get(k, ABSENT) != b.get(k, ABSENT)]


def describe(diffs, limit: int = 3) -> str:
    """``a=1 there, a=2 here; ...`` for the first ``limit`` differences."""
    def side(k, v, where):
        return f"no {k} {where}" if v is ABSENT else f"{k}={v!r} {where}"

    text = "; ".join(f"{side(k, x, 'there')}, {side(k, y, 'here')}" for k, x, y in diffs[:limit])
    return text + (f" (and {len(diffs) - limit} more)" if len(diffs) > limit else "")


def read(path: str, key: dict | None = None, *, mmap: bool = False) -> dict:
    """Load the checkpoint at ``path`` and check it: raise :class:`CheckpointError` when it cannot be
    read, was not written by the runner (or by an older version of it), or has a key other than ``key``.

    Every byte is checked against the CRCs of the file's records, so a damaged tensor is found too;
    ``mmap=True`` then maps the tensors instead of loading them.
    """
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format; its records carry CRCs torch.load skips
            damaged = archive.testzip()
        if damaged is None:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same here
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason})", path) from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} cannot be read ({damaged} fails its checksum)", path)
    if not isinstance(saved, dict) or "key" not in saved or "iteration" not in saved:
        raise CheckpointError(f"checkpoint {path} was not written by sfron_ops.unlearn.run", path)
    if saved.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {saved.get('version')!r}, this version reads "
                              f"{VERSION}", path)
    if key is not None:
        diffs = differences(saved["key"], key)
        if diffs:
            raise CheckpointError(f"checkpoint {path} belongs to another run: {describe(diffs)}", path, diffs)
    return saved


def check(runs) -> list[CheckpointError]:
    """A :class:`CheckpointError` for every ``(path, key)`` of ``runs`` whose file exists and cannot resume the
    run with that key (unreadable, or of another run); ``path`` None means no checkpoint. Nothing is changed."""
    problems = []
    for path, key in runs:
        if path is not None and os.path.exists(path):
            try:
                read(path, key, mmap=True)
            except CheckpointError as e:
                problems.append(e)
    return problems


def path(directory: str | None, seed: int, name: str, suffix: str = ".pt") -> str | None:
    """Where the scenarios keep run ``name`` of ``seed`` under ``directory`` (None without a directory)."""
    return None if directory is None else os.path.join(directory, f"seed{seed}", f"{name}{suffix}")


def save(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file, so that ``path`` always holds a whole checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["CheckpointError", "VERSION", "ABSENT", "digest", "run_key", "differences", "describe", "read", "check",
           "path", "save"]
