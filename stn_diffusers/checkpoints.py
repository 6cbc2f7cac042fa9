"""Training checkpoints that survive a kill at any moment.

A checkpoint is a folder ``checkpoint-<step>`` holding everything ``accelerator.save_state`` writes
(model, optimiser, scheduler, random states, registered objects) and, written last, a manifest
``checkpoint.json`` that names every file and its size. Fine-tuning (:mod:`stn_diffusers.finetune`)
keeps them in ``<output_dir>/checkpoints``, ``scripts/train_vae.py`` next to the model it trains;
both write and find them only through this module.

Write order (:func:`save_checkpoint`), so that a complete checkpoint is on disk at every moment:

1. ``save_state`` into ``.partial-checkpoint-<step>``, then the manifest;
2. an atomic rename to ``checkpoint-<step>``;
3. only then the checkpoints beyond ``total_limit`` (the oldest first) and stale partial folders
   are removed, each renamed to a partial name before it is deleted, so that a half-deleted folder
   never looks like a checkpoint.

A folder named ``checkpoint-<step>`` whose manifest is missing or does not match its files (a copy
cut short, a disk error) is *incomplete*: ``resume_from_checkpoint="latest"`` skips it, and fails
with a ``ValueError`` naming the folder when checkpoints exist but none is complete, rather than
silently starting again from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
MANIFEST_FILE = "checkpoint.json"
LATEST = "latest"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, or ``None`` for any other name."""
    name = Path(path).name
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Folders named ``checkpoint-<step>`` directly under ``folder``, oldest first (complete or not;
    partial writes are not listed). ``[]`` when ``folder`` does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a manifest and every file it names, at the recorded size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_manifest(path: Path, step: int) -> None:
    files = {
        file.relative_to(path).as_posix(): file.stat().st_size
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name != MANIFEST_FILE
    }
    (path / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _remove(path: Path) -> None:
    """Delete a folder; renamed to a partial name first, so that it stops counting as a checkpoint
    the moment its deletion starts."""
    doomed = path if path.name.startswith(PARTIAL_PREFIX) else path.with_name(f"{PARTIAL_PREFIX}removed-{path.name}")
    if doomed != path:
        if doomed.exists():  # left by a deletion cut short
            shutil.rmtree(doomed)
        os.replace(path, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(accelerator, folder: str | os.PathLike, step: int, total_limit: int | None = None) -> Path:
    """Save the training state as ``folder/checkpoint-<step>``, atomically; returns that folder.

    Every process calls this (``save_state`` writes each process's random state). Then, on the main
    process, the checkpoints beyond the newest ``total_limit`` complete ones are removed (the one just
    written is always kept), along with stale partial folders of interrupted writes.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"expected a checkpoint total limit >= 1 (or None for no limit), got {total_limit}")
    folder = Path(folder)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f"{PARTIAL_PREFIX}{final.name}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(partial, step)
        if final.exists():
            # Re-saving a step (a run resumed from an older checkpoint): the old copy goes first.
            _remove(final)
        os.replace(partial, final)
        logger.info("Saved %s", final)
        _rotate(folder, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def _rotate(folder: Path, newest: Path, total_limit: int | None) -> None:
    """Remove stale partial folders, and the checkpoints beyond ``total_limit`` (``newest`` stays)."""
    for stale in folder.glob(f"{PARTIAL_PREFIX}*"):
        if stale.is_dir():
            _remove(stale)
    if total_limit is None:
        return
    others = [p for p in list_checkpoints(folder) if p != newest]
    complete = [p for p in others if is_complete(p)]
    kept = set(complete[max(0, len(complete) - total_limit + 1) :])  # with `newest`: total_limit in all
    for old in others:  # incomplete ones are never resumed from: they go too
        if old not in kept:
            _remove(old)


def resolve_checkpoint(folder: str | os.PathLike, resume_from: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: ``resume_from`` itself, or the newest complete one under
    ``folder`` for ``"latest"``. ``None`` when ``resume_from`` is ``None``, or ``"latest"`` finds
    no checkpoint folder at all (a first run).

    Raises:
        ValueError: ``"latest"`` finds checkpoint folders (complete, incomplete or partial) but no
            complete one, or ``resume_from`` names a folder that is not a complete checkpoint.
        FileNotFoundError: ``resume_from`` names a folder that does not exist.
    """
    if resume_from is None:
        return None
    folder = Path(folder)
    if str(resume_from) == LATEST:
        found = list_checkpoints(folder)
        complete = [p for p in found if is_complete(p)]
        partial = sorted(folder.glob(f"{PARTIAL_PREFIX}*")) if folder.is_dir() else []
        if complete:
            latest = complete[-1]
            skipped = [p.name for p in found if checkpoint_step(p) > checkpoint_step(latest)]
            if skipped:
                logger.warning("Skipped incomplete checkpoint(s) newer than %s: %s", latest.name, ", ".join(skipped))
            return latest
        if found or partial:
            names = ", ".join(p.name for p in [*found, *partial])
            raise ValueError(
                f"expected a complete checkpoint (a {CHECKPOINT_PREFIX}N folder holding {MANIFEST_FILE}) in "
                f"{str(folder)!r} to resume from, found only incomplete or partial ones: {names}; remove them "
                "to start again from step 0"
            )
        return None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected --resume_from_checkpoint to be {LATEST!r} or a checkpoint folder, got {str(path)!r}"
        )
    if checkpoint_step(path) is None or not is_complete(path):
        raise ValueError(
            f"expected a complete checkpoint (a {CHECKPOINT_PREFIX}N folder holding {MANIFEST_FILE}), got {str(path)!r}"
        )
    return path
