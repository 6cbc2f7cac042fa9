"""Align many pairs: a CSV of pairs, two folders matched by file name, or two image columns of a
Hugging Face dataset, on one process or on several.

    stn-diffusers align --pairs pairs.csv --output-dir aligned
    stn-diffusers align --image-dir moving --reference-dir references --output-dir aligned --skip-existing
    accelerate launch --num_processes 2 -m stn_diffusers.cli align --dataset DIR \\
        --image-column image --reference-column reference --output-dir aligned
    torchrun --standalone --nproc_per_node 2 -m stn_diffusers.cli align --pairs pairs.csv --output-dir aligned

What ``output_dir`` holds at the end:
    - ``{index:06d}_{stem}.png`` per pair aligned: its image aligned onto its reference (the pixel warp
      at the image's own size, or with ``decoded=True`` the VAE round trip at the working size);
    - ``results.jsonl``: one JSON record per pair, in pair order (:func:`pair_record`): the pair's
      index and input names, its output, θ and its pixel matrix (:func:`theta_report`), the
      displacement, ``unwarped``, ``refined`` and ``confidence``; a pair that failed (a missing file,
      an unreadable image, a mask of the wrong size…) has ``error``, a one-line message, instead;
    - ``summary.json`` (:func:`align_pairs`'s return value): counts, time, pairs per second.

Records are appended, one batch at a time, to a shard per process (``results.rank{R}.jsonl``); at the
end the main process merges the shards into ``results.jsonl``, each pair once and in order, and removes
them. An image is written (atomically) before its record, so a recorded pair has its image. With
``skip_existing=True`` a run resumes an interrupted one: a pair recorded in ``results.jsonl`` or in a
shard (failures included: delete a record to retry its pair) is not aligned again, and a last line cut
short by a kill is dropped, its pair aligned again. Each process locks its shard while it writes, and a
run does not start while a shard is locked: a worker left running by a killed launcher (``torchrun``
starts its workers in sessions of their own) would otherwise write beside the resumed run.

Processes: under ``accelerate launch`` or ``torchrun`` every process reads the same records, then takes
its share of the pairs not yet recorded (``PartialState.split_between_processes``). CPU processes join
with gloo; a plain ``python`` or ``stn-diffusers`` run is one process and needs no launcher.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from . import data, files, geometry
from .errors import USER_ERRORS
from .images import open_image, to_mask_tensor, to_pil_rgb

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, shards go unguarded
    fcntl = None

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
SHARD_FILE = "results.rank{}.jsonl"
SHARD_GLOB = "results.rank*.jsonl"
DEFAULT_BATCH_SIZE = 8
# Columns of a pairs CSV: the two images, and optionally an ignore mask drawn on the reference.
CSV_COLUMNS = ("image", "reference")
CSV_MASK_COLUMN = "mask"
# Output names: the pair's index (zero-padded, so that names sort in pair order) and its image's stem.
OUTPUT_NAME = "{index:06d}_{stem}.png"
STEM_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM_LENGTH = 64
# Failures listed in the summary and printed (every one is in results.jsonl).
MAX_ERRORS_SHOWN = 10
THETA_CONVENTION = (
    "theta maps output (aligned) normalised coords to input coords, align_corners=False; pixel_matrix maps "
    "output pixels to input pixels (cv2.warpAffine, or cv2.warpPerspective for a homography, with WARP_INVERSE_MAP)"
)


def theta_report(theta: torch.Tensor, height: int, width: int) -> dict:
    """θ ``(1, 2, 3)`` or ``(1, 3, 3)`` as JSON values: ``theta``, its ``pixel_matrix`` ``(3, 3)`` at
    ``height × width`` (see :data:`THETA_CONVENTION`) and ``image_size`` ``[height, width]``."""
    pixel = geometry.theta_to_pixel_matrix(theta.double(), height, width)[0]
    return {"theta": theta[0].tolist(), "pixel_matrix": pixel.tolist(), "image_size": [height, width]}


# ------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PairEntry:
    """One pair to align: its ``index`` (its id in ``results.jsonl`` and in its output's name; a
    dataset's row) and the names of its inputs as recorded (paths as the list gives them)."""

    index: int
    image: str
    reference: str
    mask: str | None = None

    @property
    def output_name(self) -> str:
        stem = STEM_CHARACTERS.sub("_", Path(self.image).stem).strip("_")[:MAX_STEM_LENGTH] or "pair"
        return OUTPUT_NAME.format(index=self.index, stem=stem)


@dataclass
class LoadedPair:
    """A pair read and checked: RGB ``image`` and ``reference``, and ``ignore_mask`` ``(1, H_ref, W_ref)``
    (1 = a reference pixel not to use) or ``None``."""

    entry: PairEntry
    image: PIL.Image.Image
    reference: PIL.Image.Image
    ignore_mask: torch.Tensor | None


# Reads a pair's (image, reference, mask or None) as upright PIL images, modes kept.
PairReader = Callable[[PairEntry], tuple[PIL.Image.Image, PIL.Image.Image, PIL.Image.Image | None]]


class PairList:
    """The pairs of a run: ``entries``, listed up front (cheap: names only), and ``read``, which reads
    one pair when its batch comes, so that a bad file fails its pair alone. ``input_files(entry)``
    gives the files a pair reads (none for a dataset), which no output may replace."""

    def __init__(
        self,
        entries: list[PairEntry],
        read: PairReader,
        input_files: Callable[[PairEntry], list[Path]] | None = None,
    ):
        if not entries:
            raise ValueError("expected at least one pair to align, got none")
        self.entries = entries
        self.read = read
        self.input_files = input_files or (lambda entry: [])

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, entry: PairEntry) -> LoadedPair:
        """The pair read and checked; ``ValueError``/``OSError`` naming the file or the problem (a
        mask of another size than the reference, or one that ignores every pixel)."""
        image, reference, mask = self.read(entry)
        image, reference = to_pil_rgb(image), to_pil_rgb(reference)
        ignore_mask = None
        if mask is not None:
            ignore_mask = to_mask_tensor(mask, "mask")  # (1, H, W), 1 = ignore
            if tuple(ignore_mask.shape[-2:]) != (reference.height, reference.width):
                raise ValueError(
                    f"expected the mask at the reference's size, {reference.width}×{reference.height} (it marks "
                    f"pixels of the reference), got {ignore_mask.shape[-1]}×{ignore_mask.shape[-2]}"
                )
            if bool(ignore_mask.min() >= 1):
                raise ValueError("expected the mask to leave some reference pixels to use (black = use), got all white")
        return LoadedPair(entry, image, reference, ignore_mask)


def pairs_from_csv(path: str | os.PathLike) -> PairList:
    """Pairs listed in a CSV with a header row ``image,reference[,mask]``, paths relative to the CSV's
    folder (or absolute). ``mask``, where given, is an ignore mask drawn on the reference (white = a
    pixel not to use, at the reference's size); an empty cell means none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a CSV of pairs at {str(path)!r}, found none")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        if any(column not in header for column in CSV_COLUMNS):
            raise ValueError(
                f"expected a header row with the columns {','.join(CSV_COLUMNS)}[,{CSV_MASK_COLUMN}] in "
                f"{str(path)!r}, got {','.join(header) or 'an empty file'}"
            )
        rows = list(reader)

    def cell(row: dict, column: str) -> str:
        return (row.get(column) or "").strip()

    entries = [
        PairEntry(index, cell(row, "image"), cell(row, "reference"), cell(row, CSV_MASK_COLUMN) or None)
        for index, row in enumerate(rows)
    ]
    folder = path.parent

    def files_of(entry: PairEntry) -> list[Path]:
        return [folder / name for name in (entry.image, entry.reference, entry.mask) if name]

    def read(entry: PairEntry):
        for what, name in (("image", entry.image), ("reference", entry.reference)):
            if not name:
                raise ValueError(f"expected a path in the {what} column of row {entry.index + 1} of {str(path)!r}")
        mask = open_image(folder / entry.mask, "mask") if entry.mask else None
        return open_image(folder / entry.image, "image"), open_image(folder / entry.reference, "reference"), mask

    return PairList(entries, read, files_of)


def pairs_from_folders(image_dir: str | os.PathLike, reference_dir: str | os.PathLike) -> PairList:
    """A pair per image under ``image_dir`` (recursive, sorted), its reference the file of the same
    relative path under ``reference_dir``; an image without one is a pair that fails."""
    image_dir, reference_dir = Path(image_dir), Path(reference_dir)
    if not reference_dir.is_dir():
        raise FileNotFoundError(f"expected a folder of references at {str(reference_dir)!r}, found none")
    names = [path.relative_to(image_dir).as_posix() for path in data.list_images(image_dir)]
    entries = [PairEntry(index, name, name) for index, name in enumerate(names)]

    def files_of(entry: PairEntry) -> list[Path]:
        return [image_dir / entry.image, reference_dir / entry.reference]

    def read(entry: PairEntry):
        image = open_image(image_dir / entry.image, "image")
        return image, open_image(reference_dir / entry.reference, "reference"), None

    return PairList(entries, read, files_of)


def pairs_from_dataset(
    name_or_path: str | os.PathLike,
    image_column: str,
    reference_column: str,
    mask_column: str | None = None,
    config: str | None = None,
    split: str = data.DEFAULT_SPLIT,
) -> PairList:
    """A pair per row of one split of a Hugging Face dataset (see :func:`stn_diffusers.data.load_dataset_split`):
    the images of ``image_column`` onto those of ``reference_column``, with the ignore masks of
    ``mask_column`` where given (white = a reference pixel not to use). Pair ``i`` is row ``i``."""
    columns = [column for column in (image_column, reference_column, mask_column) if column is not None]
    dataset = data.undecoded_image_columns(data.load_dataset_split(name_or_path, config, split), columns)
    dataset = dataset.select_columns(list(dict.fromkeys(columns)))  # a row read decodes nothing else
    images = data.dataset_cell_names(dataset, image_column)
    references = data.dataset_cell_names(dataset, reference_column)
    masks = data.dataset_cell_names(dataset, mask_column) if mask_column is not None else [None] * len(images)
    entries = [PairEntry(row, *names) for row, names in enumerate(zip(images, references, masks))]

    def read(entry: PairEntry):
        row = dataset[entry.index]
        decoded = [
            data.decode_dataset_image(row[column], f"row {entry.index} of the column {column!r}") for column in columns
        ]
        return decoded[0], decoded[1], decoded[2] if mask_column is not None else None

    return PairList(entries, read)


# ---------------------------------------------------------------------------------------- records
def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a results file; lines that are not a whole record (a line cut short by a kill)
    are left out, as is a missing file."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int):
            records.append(record)
    return records


def recorded_indices(output_dir: str | os.PathLike) -> set[int]:
    """Indices of the pairs recorded in ``output_dir``: in ``results.jsonl`` or any process's shard."""
    output_dir = Path(output_dir)
    paths = [output_dir / RESULTS_FILE, *sorted(output_dir.glob(SHARD_GLOB))]
    return {record["index"] for path in paths for record in read_records(path)}


def merge_records(output_dir: str | os.PathLike) -> list[dict]:
    """Merge ``results.jsonl`` and every shard into ``results.jsonl`` (written atomically), each pair
    once (its first record) and in pair order; then remove the shards. Returns the merged records."""
    output_dir = Path(output_dir)
    shards = sorted(output_dir.glob(SHARD_GLOB))
    merged: dict[int, dict] = {}
    for path in [output_dir / RESULTS_FILE, *shards]:
        for record in read_records(path):
            merged.setdefault(record["index"], record)
    records = [merged[index] for index in sorted(merged)]
    text = "".join(json.dumps(record) + "\n" for record in records)
    files.write_outputs({output_dir / RESULTS_FILE: files.text_writer(text)})
    for shard in shards:  # after the merged file is in place: a kill here leaves only duplicates
        shard.unlink()
    return records


def _lock(handle, path: Path) -> None:
    """Lock the open shard ``handle`` for as long as it stays open (the system releases the lock when
    the process ends, however it ends); ``ValueError`` when another process holds it: a worker still
    writing, e.g. one left running by a launcher killed without its workers."""
    if fcntl is None:
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        raise ValueError(
            f"expected no other process writing to {str(path.parent)!r}, but {path.name} is locked by a running "
            "one (a worker of a launcher that was killed?); stop it, then resume with --skip-existing"
        ) from error


def _check_no_writers(output_dir: Path) -> None:
    """Refuse to start while any shard in ``output_dir`` is locked by a running process (see :func:`_lock`)."""
    for shard in sorted(output_dir.glob(SHARD_GLOB)):
        with shard.open("a", encoding="utf-8") as handle:
            _lock(handle, shard)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left without its newline (a kill mid-write), so that appending starts a new line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("r+b") as handle:
        content = handle.read()
        if content.endswith(b"\n"):
            return
        handle.truncate(content.rfind(b"\n") + 1)


def pair_record(entry: PairEntry, output, index_in_call: int, image: PIL.Image.Image) -> dict:
    """The ``results.jsonl`` record of a pair aligned as item ``index_in_call`` of a pipeline ``output``."""
    i = index_in_call
    return {
        "index": entry.index, "image": entry.image, "reference": entry.reference, "mask": entry.mask,
        "output": entry.output_name, **theta_report(output.theta[i : i + 1].cpu(), image.height, image.width),
        "displacement": float(output.displacement[i]), "unwarped": bool(output.unwarped[i]),
        "refined": None if output.refined is None else bool(output.refined[i]),
        "confidence": None if output.confidence is None else float(output.confidence[i]),
    }  # fmt: skip


def error_record(entry: PairEntry, error: BaseException) -> dict:
    """The ``results.jsonl`` record of a pair that failed: its names and the error, on one line."""
    message = " ".join(str(error).split()) or type(error).__name__
    return {"index": entry.index, "image": entry.image, "reference": entry.reference, "mask": entry.mask,
            "error": message}  # fmt: skip


# ------------------------------------------------------------------------------------------ checks
def check_output_dir(
    pairs: PairList, output_dir: str | os.PathLike, skip_existing: bool = False, label: str = "output_dir"
) -> None:
    """Check, before anything is computed, that ``output_dir`` can be made and written to (making it)
    and that a run will replace nothing it should not: without ``skip_existing``, a folder that holds
    results of an earlier run (``results.jsonl``, a shard) or a file of the name a pair's output takes
    is refused, naming it."""
    files.check_output_folder(output_dir, label)
    if skip_existing:
        return
    output_dir = Path(output_dir)
    earlier = [path.name for path in [output_dir / RESULTS_FILE, *sorted(output_dir.glob(SHARD_GLOB))] if path.exists()]
    if earlier:
        raise ValueError(
            f"expected {label} without the results of an earlier run, found {', '.join(earlier)} in "
            f"{str(output_dir)!r}; pass --skip-existing to resume that run, or choose another folder"
        )
    taken = [entry.output_name for entry in pairs.entries if (output_dir / entry.output_name).exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ValueError(
            f"expected {label} without files named as the outputs, found {taken[0]!r}{more} in {str(output_dir)!r}; "
            "pass --skip-existing to resume a run, or choose another folder"
        )


# --------------------------------------------------------------------------------------- aligning
def launch_state(device: torch.device):
    """accelerate's ``PartialState`` of this process and the device it aligns on.

    Launched (``accelerate launch``, ``torchrun``) on CPUs, the processes join with gloo; on GPUs each
    takes its own (``cuda:LOCAL_RANK``). A plain run is one process, with ``device`` as given.
    """
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        return PartialState(), device
    state = PartialState(cpu=device.type == "cpu")
    return state, state.device if device.type == "cuda" else device


def _working_size_key(pipe, pair: LoadedPair) -> tuple[int, int]:
    """The working size the pipeline encodes ``pair`` at: pairs of one size share a call."""
    conditioned = pipe.stn.config.conditioning == "reference"
    source = pair.reference if conditioned else pair.image
    return pipe.working_size((source.height, source.width))


def _call_pipeline(pipe, pairs: list[LoadedPair], options: dict):
    """One pipeline call over ``pairs`` (of one working size): an ignore mask per pair where any has
    one (an all-black one, every pixel used, for the others)."""
    masks = None
    if any(pair.ignore_mask is not None for pair in pairs):
        unmasked = [torch.zeros(1, pair.reference.height, pair.reference.width) for pair in pairs]
        masks = [pair.ignore_mask if pair.ignore_mask is not None else zeros for pair, zeros in zip(pairs, unmasked)]
    return pipe(
        [pair.image for pair in pairs], reference=[pair.reference for pair in pairs], ignore_mask=masks,
        batch_size=len(pairs), **options,
    )  # fmt: skip


def _align_batch(pipe, pairs: PairList, batch: list[PairEntry], output_dir: Path, options: dict, strict: bool):
    """Align one batch of pairs; write each aligned image, return a record per pair in batch order.

    A pair that cannot be read, or that its pipeline call refuses, gets an error record (with
    ``strict``, a ``ValueError`` naming the pair ends the run instead). A call over several pairs that
    fails is retried pair by pair, so that one bad pair never fails its batch.
    """
    records: dict[int, dict] = {}

    def fail(entry: PairEntry, error: BaseException) -> None:
        if strict:
            raise ValueError(f"pair {entry.index} ({entry.image} onto {entry.reference}): {error}") from error
        records[entry.index] = error_record(entry, error)

    # 1. Read and check every pair of the batch
    loaded: dict[tuple[int, int], list[LoadedPair]] = {}
    for entry in batch:
        output = output_dir / entry.output_name
        try:
            replaced = [path for path in pairs.input_files(entry) if files.same_file(output, path)]
            if replaced:
                raise ValueError(f"expected the output {str(output)!r} to differ from the input {str(replaced[0])!r}")
            pair = pairs.load(entry)
            loaded.setdefault(_working_size_key(pipe, pair), []).append(pair)
        except USER_ERRORS as error:
            fail(entry, error)

    # 2. Align: one call per working size, pair by pair where a call is refused
    for group in loaded.values():
        calls = [group]
        try:
            results = [_call_pipeline(pipe, group, options)]
        except USER_ERRORS as error:
            if len(group) == 1:
                fail(group[0].entry, error)
                continue
            calls, results = [], []
            for pair in group:
                try:
                    results.append(_call_pipeline(pipe, [pair], options))
                    calls.append([pair])
                except USER_ERRORS as single_error:
                    fail(pair.entry, single_error)

        # 3. Write each image before its record: a recorded pair always has its image
        for call, output in zip(calls, results):
            pictures = output.images if options["decode"] else output.warped_images
            for i, pair in enumerate(call):
                path = output_dir / pair.entry.output_name
                files.write_outputs({path: files.image_writer(pictures[i], path)})
                records[pair.entry.index] = pair_record(pair.entry, output, i, pair.image)
    return [records[entry.index] for entry in batch]


def align_pairs(
    pipe,
    pairs: PairList,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    skip_existing: bool = False,
    strict: bool = False,
    min_displacement: float = 0.0,
    refine: str | None = None,
    decoded: bool = False,
    state=None,
    progress: bool = True,
) -> dict | None:
    """Align every pair of ``pairs`` with ``pipe`` (an :class:`~stn_diffusers.STNAlignmentPipeline`) and
    write the images, ``results.jsonl`` and ``summary.json`` to ``output_dir`` (see the module docs).

    Args:
        batch_size: pairs read and aligned at once (one pipeline call per working size among them).
        skip_existing: resume: pairs recorded in ``output_dir`` are not aligned again. Without it a
            folder holding earlier results is refused (:func:`check_output_dir`).
        strict: the first pair that fails raises ``ValueError`` naming it; otherwise it is recorded with
            its ``error`` and the run goes on.
        min_displacement, refine: as in the pipeline's call.
        decoded: write the VAE round trip (at the working size) instead of the pixel warp.
        state: accelerate's ``PartialState`` (default: :func:`launch_state`'s); every process of a
            launched run calls this function, and each aligns its share of the pairs.
        progress: show a tqdm bar (on the main process only).

    Returns:
        On the main process, the summary written to ``summary.json``: ``num_pairs``; ``ok`` and
        ``failed``, the pairs this run aligned and failed; ``skipped``, those recorded before it;
        ``seconds``, from the first pair read to the merged results (loading the pipeline excluded);
        ``pairs_per_second``, (``ok`` + ``failed``) / ``seconds``; ``num_processes``, ``batch_size``;
        ``errors``, the first few failures. ``None`` on the other processes.
    """
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    output_dir = Path(output_dir)
    if state is None:
        state, _ = launch_state(pipe.device)
    options = {"min_displacement": min_displacement, "refine": refine, "decode": decoded}

    # 1. What is left to do: every process reads the same records before any process writes one
    check_output_dir(pairs, output_dir, skip_existing)
    if state.is_main_process:  # one process alone tries the locks: two trying at once would see each other
        _check_no_writers(output_dir)
    done = recorded_indices(output_dir) if skip_existing else set()
    todo = [entry for entry in pairs.entries if entry.index not in done]
    state.wait_for_everyone()
    started = time.perf_counter()

    # 2. Align this process's share, appending its records to its own shard batch by batch
    with state.split_between_processes(todo) as mine:
        shard = output_dir / SHARD_FILE.format(state.process_index)
        shown = progress and state.is_main_process
        with tqdm(total=len(mine), desc="Aligning", unit="pair", disable=not shown) as bar:
            with shard.open("a", encoding="utf-8") as handle:  # appends go to the end, wherever it moves
                _lock(handle, shard)
                _drop_partial_line(shard)
                for start in range(0, len(mine), batch_size):
                    batch = mine[start : start + batch_size]
                    records = _align_batch(pipe, pairs, batch, output_dir, options, strict)
                    handle.write("".join(json.dumps(record) + "\n" for record in records))
                    handle.flush()  # a kill loses at most the batch in flight
                    bar.update(len(batch))

    # 3. The main process merges every shard, once all have finished, and sums up
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = merge_records(output_dir)
    fresh = [record for record in records if record["index"] not in done]
    failed = [record for record in fresh if "error" in record]
    seconds = time.perf_counter() - started
    summary = {
        "num_pairs": len(pairs), "ok": len(fresh) - len(failed), "failed": len(failed),
        "skipped": len(done & {entry.index for entry in pairs.entries}), "seconds": seconds,
        "pairs_per_second": len(fresh) / seconds if seconds > 0 else None, "num_processes": state.num_processes,
        "batch_size": batch_size, "convention": THETA_CONVENTION,
        "errors": [{"index": record["index"], "error": record["error"]} for record in failed[:MAX_ERRORS_SHOWN]],
    }  # fmt: skip
    files.write_outputs({output_dir / SUMMARY_FILE: files.text_writer(json.dumps(summary, indent=2) + "\n")})
    return summary


def summary_text(summary: dict, output_dir: str | os.PathLike) -> str:
    """The lines printed at the end of a run: counts, speed, the first failures and what was written."""
    speed = summary["pairs_per_second"]
    rate = f"{speed:.2f} pairs/s, " if speed is not None else ""
    lines = [
        f"aligned {summary['ok']} pair(s), {summary['failed']} failed, {summary['skipped']} skipped (recorded "
        f"before) of {summary['num_pairs']} in {summary['seconds']:.1f} s "
        f"({rate}{summary['num_processes']} process(es))"
    ]
    lines += [f"  failed: pair {error['index']}: {error['error']}" for error in summary["errors"]]
    output_dir = Path(output_dir)
    lines.append(f"wrote {output_dir / RESULTS_FILE} and {output_dir / SUMMARY_FILE}")
    return "\n".join(lines)
