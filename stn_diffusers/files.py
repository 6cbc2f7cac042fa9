"""Output files, written all or none, and the checks made on their paths before anything is computed.

Every command and library function that writes files (``align``, ``evaluate``, :func:`analysis.analyze`,
:func:`demo.run_demo`) computes all its outputs first, then hands them to :func:`write_outputs`: each
output is written to a temporary file beside it, and only when all are written are they renamed into
place, so a failure (a full disk, an unencodable image) leaves neither a half-written file nor a half
set. A writer (:func:`text_writer`, :func:`image_writer`, :func:`figure_writer`) takes the final path
to choose the file's format, since the temporary file's name has no meaningful extension.

The checks (:func:`check_outputs`, :func:`check_output_folder`) name each path with a caller's label,
``--output`` for the command line or ``output_dir`` for a library call, in their error messages.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import PIL.Image

from .data import IMAGE_EXTENSIONS

# Suffix of the temporary file an output is written to before it is renamed into place.
PARTIAL_SUFFIX = ".partial"

Writer = Callable[[Path], None]


# ----------------------------------------------------------------------------------------- writing
def write_outputs(writers: dict[str | os.PathLike, Writer]) -> None:
    """Write all of a set of output files, or none of them.

    ``writers`` maps each output path to ``write(temporary_path)``; every one first writes a
    temporary file beside its output, and only when all have succeeded are they renamed into place
    (``os.replace``, atomic on one file system). A failure while writing removes the temporary files
    and leaves every output as it was. The outputs' folders must exist (:func:`check_outputs` and
    :func:`check_output_folder` make them).
    """
    partials: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            path = Path(path)
            # Hidden, beside the output (one file system: the rename is atomic), named after this process.
            partials[path] = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
            write(partials[path])
        for path, partial in partials.items():
            os.replace(partial, path)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)


def text_writer(text: str) -> Writer:
    """A :func:`write_outputs` writer of a UTF-8 text file."""
    return lambda partial: partial.write_text(text, encoding="utf-8")


PNG_COMPRESS_LEVEL = 1


def image_writer(picture: PIL.Image.Image, path: str | os.PathLike) -> Writer:
    """A :func:`write_outputs` writer that saves ``picture`` in the format of ``path``'s extension."""
    name = image_format(path)
    # Fast PNG compression: a file ~8 % larger, written ~4× faster (the save was a visible share of `align`).
    options = {"compress_level": PNG_COMPRESS_LEVEL} if name == "PNG" else {}
    return lambda partial: picture.save(partial, format=name, **options)


def figure_writer(figure, path: str | os.PathLike, **savefig_options) -> Writer:
    """A :func:`write_outputs` writer that saves a matplotlib ``figure`` in the format of ``path``'s
    extension, passing ``savefig_options`` (``dpi=100``…) to ``figure.savefig``."""
    name = figure_format(figure, path)
    return lambda partial: figure.savefig(partial, format=name, **savefig_options)


# ------------------------------------------------------------------------------------------ formats
def image_format(path: str | os.PathLike, label: str = "the image path") -> str:
    """The Pillow format that writes ``path``, chosen from its extension; ``ValueError`` naming
    ``label`` when Pillow cannot write that extension."""
    formats = PIL.Image.registered_extensions()  # {".png": "PNG", ...}; loads every plugin
    name = formats.get(Path(path).suffix.lower())
    if name not in PIL.Image.SAVE:
        writable = [extension for extension, known in formats.items() if known in PIL.Image.SAVE]
        common = [extension for extension in IMAGE_EXTENSIONS if extension in writable]
        raise ValueError(
            f"expected {label} to end in an image extension Pillow can write ({', '.join(common)} or "
            f"{len(writable) - len(common)} more), got {str(path)!r}"
        )
    return name


def figure_format(figure, path: str | os.PathLike, label: str = "the figure path") -> str:
    """The matplotlib format (``"png"``, ``"svg"``, ``"pdf"``…) that writes ``figure`` to ``path``,
    chosen from its extension; ``ValueError`` naming ``label`` when matplotlib cannot write it."""
    supported = figure.canvas.get_supported_filetypes()  # {"png": "Portable Network Graphics", ...}
    name = Path(path).suffix.lower().lstrip(".")
    if name not in supported:
        raise ValueError(
            f"expected {label} to end in a figure extension matplotlib can write "
            f"({', '.join('.' + known for known in supported)}), got {str(path)!r}"
        )
    return name


# ------------------------------------------------------------------------------------------- checks
def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path once resolved, or (both existing) one file
    reached by hard links or on a case-insensitive disk."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    return first.exists() and second.exists() and os.path.samefile(first, second)


def check_writable_folder(folder: str | os.PathLike, label: str) -> None:
    """Make ``folder`` if it is missing and check that a file can be created in it.

    ``NotADirectoryError`` when a file stands where a folder of the path should be; ``OSError`` with
    the system's reason when the folder cannot be made or written to. Both name ``label``.
    """
    folder = Path(folder)
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"expected {label} in a folder, but {str(existing)!r} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # permissions, read-only disks, /proc: only trying tells
            pass
    except OSError as error:
        reason = f"{error.strerror}: {error.filename!r}" if error.strerror else str(error)
        raise OSError(f"expected {label} in a folder that can be written, got {reason}") from error


def check_output_folder(folder: str | os.PathLike, label: str = "the output folder") -> None:
    """Check, before computing, that an output folder can be made and written to (making it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"expected {label} to name a folder, got the file {str(folder)!r}")
    check_writable_folder(folder, f"{label} folder {str(folder)!r}")


def check_outputs(
    outputs: dict[str, str | os.PathLike | None],
    inputs: dict[str, str | os.PathLike | None] | None = None,
    images: tuple[str, ...] = (),
    overwrite: bool = False,
    overwrite_label: str = "overwrite=True",
) -> None:
    """Check output files before anything is computed.

    Args:
        outputs: ``{label: path}`` of the output files; ``None`` paths (outputs not asked for) are skipped.
        inputs: ``{label: path}`` of the input files, which no output may be unless ``overwrite``.
        images: the labels of the outputs that are images: their extension must be one Pillow can write.
        overwrite: allow an output to replace an input.
        overwrite_label: how the caller spells ``overwrite`` (``--overwrite`` on the command line), for
            the message that suggests it.

    Each output's folder is made when missing and must be writable; no two outputs may be one file.
    """
    given_inputs = {label: Path(path) for label, path in (inputs or {}).items() if path is not None}
    checked: dict[str, Path] = {}
    for label, path in ((label, Path(path)) for label, path in outputs.items() if path is not None):
        if label in images:
            image_format(path, label)
        if path.is_dir():
            raise IsADirectoryError(f"expected {label} to name a file, got the folder {str(path)!r}")
        for other_label, other in checked.items():
            if same_file(path, other):
                raise ValueError(
                    f"expected distinct output files, got {str(path)!r} for both {other_label} and {label}"
                )
        for input_label, source in given_inputs.items():
            if not overwrite and same_file(path, source):
                raise ValueError(
                    f"expected {label} to differ from {input_label}, got {str(path)!r} for both; "
                    f"pass {overwrite_label} to replace the input"
                )
        check_writable_folder(path.parent, f"{label} {str(path)!r}")
        checked[label] = path
