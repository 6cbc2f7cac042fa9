"""`stn-diffusers align` over many pairs: one process, two processes, and a run killed halfway then resumed.

    python benchmarks/batch_align.py                                  # 1000 pairs, 512×512, the embedded STN
    python benchmarks/batch_align.py --num_pairs 40 --work_dir /tmp/batch-align --keep

Writes ``num_pairs`` seeded pairs (:func:`stn_diffusers.data.seeded_pair`, cycling over the held-out
photos in ``data/photos/heldout``) as JPEG files with a ``pairs.csv``, then runs the command line as a
user would (a subprocess each):

1. ``stn-diffusers align --pairs pairs.csv`` on one process with every core's thread;
2. the same under ``torchrun --nproc_per_node 2``, each process with half the threads;
3. the two-process run killed (SIGKILL to the launcher and every worker: a crash, not a stop) once
   half the pairs are recorded, then the same command with ``--skip-existing``.

Each run must leave ``results.jsonl`` with every pair exactly once, in order, and no shard; the
script exits with status 1 otherwise. The table gives, per run, the pairs the command aligned (a
resumed run skips those recorded before the kill), its wall time (Python start, model loading and the
merge included), the pairs per second over that wall time and those of ``summary.json`` (from the
first pair read to the merged results), the mean corner error of the recorded θ against the true one
(:func:`stn_diffusers.geometry.corner_error`, pixels at the pair resolution), and the largest
difference of θ from the one-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # accelerate's dependency
import torch

from stn_diffusers import batch_align, data, geometry, metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
HELDOUT = REPO_ROOT / "data" / "photos" / "heldout"
JPEG_QUALITY = 95
# How often the killed run's records are counted, and how long any one run may take.
POLL_SECONDS = 0.5
RUN_TIMEOUT_SECONDS = 6 * 3600


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_pairs", type=int, default=1000, help="pairs written and aligned by each run")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the square pairs")
    parser.add_argument("--warp", default="standard", choices=tuple(geometry.WARP_PRESETS), help="misalignment")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    parser.add_argument("--batch_size", type=int, default=batch_align.DEFAULT_BATCH_SIZE, help="align --batch-size")
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--photos", default=str(HELDOUT), help="folder of photos to cut the pairs from")
    parser.add_argument("--work_dir", default=None, help="folder for the pairs and outputs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args()


def write_pairs(args: argparse.Namespace, folder: Path) -> list[torch.Tensor]:
    """Write the pairs' JPEG files and ``pairs.csv`` into ``folder``; return the true θ of each ``(2, 3)``."""
    from stn_diffusers.images import tensor_to_pil

    sources, paths = data.load_photo_folder(args.photos)
    names = [path.stem for path in paths]
    (folder / "pairs").mkdir(parents=True, exist_ok=True)
    rows, truths = ["image,reference"], []
    for index in range(args.num_pairs):
        pair = data.seeded_pair(sources, index, args.resolution, args.warp, args.seed, names=names)
        moving, reference = f"pairs/{index:06d}_moving.jpg", f"pairs/{index:06d}_reference.jpg"
        tensor_to_pil(pair.moving).save(folder / moving, quality=JPEG_QUALITY)
        tensor_to_pil(pair.reference).save(folder / reference, quality=JPEG_QUALITY)
        rows.append(f"{moving},{reference}")
        truths.append(pair.theta)
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return truths


def align_command(args: argparse.Namespace, folder: Path, output: str, processes: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // processes)
    launcher = [sys.executable, "-m", "stn_diffusers.cli"]
    if processes > 1:  # --standalone: a free port, so that runs side by side never collide
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    "-m", "stn_diffusers.cli"]  # fmt: skip
    command = [*launcher, "align", "--pairs", str(folder / "pairs.csv"), "--output-dir", str(folder / output),
               "--batch-size", str(args.batch_size), "--threads", str(threads)]  # fmt: skip
    return command + (["--pipeline", args.pipeline] if args.pipeline else [])


def environment(processes: int) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // processes)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}


def run(command: list[str], processes: int) -> float:
    """Run ``command`` to its end; its wall time in seconds. A failure ends the benchmark with its stderr."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment(processes),
                            timeout=RUN_TIMEOUT_SECONDS)  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the command failed with status {result.returncode}:\n{result.stderr[-3000:]}")
    print(result.stdout.strip(), flush=True)
    return seconds


def run_and_kill_halfway(command: list[str], processes: int, output: Path, num_pairs: int) -> int:
    """Start ``command``; once half the pairs are recorded, SIGKILL it and every process under it
    (torchrun starts its workers in sessions of their own: killing its group would leave them
    running). Returns the number of records the shards held at the kill."""
    print("$ " + " ".join(command) + "   # killed halfway", flush=True)
    process = subprocess.Popen(command, env=environment(processes), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    recorded = 0
    while process.poll() is None:
        recorded = sum(len(batch_align.read_records(shard)) for shard in output.glob(batch_align.SHARD_GLOB))
        if recorded >= num_pairs // 2:
            launcher = psutil.Process(process.pid)
            victims = [launcher, *launcher.children(recursive=True)]
            for victim in victims:
                victim.send_signal(signal.SIGKILL)
            psutil.wait_procs(victims)
            break
        time.sleep(POLL_SECONDS)
    process.wait()
    return sum(len(batch_align.read_records(shard)) for shard in output.glob(batch_align.SHARD_GLOB))


def check_results(output: Path, num_pairs: int) -> list[dict]:
    """The records of a finished run; exits with status 1 unless every pair is there exactly once, in
    order, without an error, and no shard is left."""
    records = batch_align.read_records(output / batch_align.RESULTS_FILE)
    problems = []
    if [record["index"] for record in records] != list(range(num_pairs)):
        problems.append(f"expected the indices 0..{num_pairs - 1} once each, in order")
    failed = [record["index"] for record in records if "error" in record]
    if failed:
        problems.append(f"pairs {failed[:5]} failed")
    shards = sorted(path.name for path in output.glob(batch_align.SHARD_GLOB))
    if shards:
        problems.append(f"shards left: {shards}")
    if problems:
        sys.exit(f"{output}: " + "; ".join(problems))
    return records


def recorded_thetas(records: list[dict]) -> torch.Tensor:
    return torch.tensor([record["theta"] for record in records], dtype=torch.float64)  # (N, 2, 3)


def main() -> None:
    args = parse_args()
    folder = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="batch-align-"))
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"expected an empty --work_dir, got {str(folder)!r} with files in it")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        truths = torch.stack(write_pairs(args, folder)).double()  # (N, 2, 3)
        print(f"wrote {args.num_pairs} pairs to {folder} in {time.perf_counter() - started:.1f} s", flush=True)

        runs = [("1 process", "one", 1, False), ("2 processes", "two", 2, False),
                ("2 processes, killed halfway, resumed", "resumed", 2, True)]  # fmt: skip
        rows, reference_thetas = [], None
        for label, output, processes, kill in runs:
            command = align_command(args, folder, output, processes)
            killed_at = None
            if kill:
                killed_at = run_and_kill_halfway(command, processes, folder / output, args.num_pairs)
                command = [*command, "--skip-existing"]
            seconds = run(command, processes)
            records = check_results(folder / output, args.num_pairs)
            summary = json.loads((folder / output / batch_align.SUMMARY_FILE).read_text())
            thetas = recorded_thetas(records)
            reference_thetas = thetas if reference_thetas is None else reference_thetas
            error = geometry.corner_error(thetas, truths, args.resolution, args.resolution).mean().item()
            resumed = f"{killed_at} before the kill, {summary['skipped']} skipped" if kill else "—"
            aligned = summary["ok"] + summary["failed"]  # by this command: a resumed run skips the recorded ones
            rows.append([
                label, aligned, f"{seconds:.1f}", f"{aligned / seconds:.2f}",
                f"{summary['pairs_per_second']:.2f}", resumed, f"{error:.2f}",
                f"{(thetas - reference_thetas).abs().max().item():.1e}",
            ])  # fmt: skip

        header = ("run", "pairs aligned", "wall s", "pairs / s (wall)", "pairs / s (summary.json)", "resumed",
                  "MACE px", "max |Δθ| vs 1 process")  # fmt: skip
        print(f"\n{args.num_pairs} pairs at {args.resolution}×{args.resolution} (warp {args.warp}, seed {args.seed}), "
              f"batch size {args.batch_size}, pipeline {args.pipeline or 'embedded default'}, "
              f"{os.cpu_count()} CPU core(s); every run recorded each pair exactly once, in order")  # fmt: skip
        print(metrics.markdown_table(header, rows))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
