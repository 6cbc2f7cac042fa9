"""Cold start of ``stn-diffusers align``: from process start to the written image, median of several runs.

    python benchmarks/cold_start.py                          # 5 runs, the embedded default, two 512×512 JPEGs
    python benchmarks/cold_start.py --runs 9 --threads 1     # extra flags go to the command
    python benchmarks/cold_start.py --pipeline DIR
    python benchmarks/cold_start.py --import-floor           # also time bare imports of torch and diffusers

Each run is a new process of the installed ``stn-diffusers`` command (``python -m stn_diffusers.cli``
where it is not installed), timed from outside, as a user waits for it: interpreter start, imports,
pipeline load, the two files read, aligned and the image written. One run first, not counted, brings
the files the command reads into the operating system's cache, as any second use of the command finds them.

``--import-floor`` also times, in the same runs, processes that only import torch, and torch plus
what loading a diffusers pipeline with this VAE imports (``DiffusionPipeline`` and ``AutoencoderTiny``):
the part of the cold start no code of this package can remove.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stn_diffusers import data, metrics
from stn_diffusers.images import tensor_to_pil


def align_command() -> list[str]:
    """The installed ``stn-diffusers`` next to this Python, else the module run by this Python."""
    script = Path(sys.executable).with_name("stn-diffusers")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stn_diffusers.cli"]


def write_pair(folder: Path, resolution: int) -> tuple[Path, Path]:
    """A seeded ``resolution``² pair from the bundled photos, as ``reference.jpg`` and ``moving.jpg``."""
    sources, names = data.bundled_photos()
    pair = data.seeded_pairs(sources, 1, resolution=resolution, names=names)[0]
    paths = folder / "reference.jpg", folder / "moving.jpg"
    for image, path in zip((pair.reference, pair.moving), paths):
        tensor_to_pil(image).save(path, quality=95)
    return paths


# What any diffusers pipeline with this VAE must import before it can load.
IMPORT_FLOOR = ("import torch", "from diffusers import DiffusionPipeline, AutoencoderTiny")


def time_run(command: list[str], output: Path | None) -> float:
    """Seconds from starting ``command`` to its exit; fails unless it exits cleanly and wrote ``output``
    (when one is named)."""
    if output is not None:
        output.unlink(missing_ok=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0 or (output is not None and not output.is_file()):
        raise SystemExit(f"{' '.join(command)} failed (exit status {result.returncode}):\n{result.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the two square inputs")
    parser.add_argument("--import-floor", action="store_true", help="also time bare imports (see the module docs)")
    args, extra = parser.parse_known_args()  # anything else is a flag of `stn-diffusers align`

    with tempfile.TemporaryDirectory() as tmp:
        reference, moving = write_pair(Path(tmp), args.resolution)
        output = Path(tmp) / "aligned.png"
        command = [*align_command(), "align", "--image", str(moving), "--reference", str(reference),
                   "--output", str(output), *extra]  # fmt: skip
        commands = {f"`stn-diffusers align{''.join(f' {flag}' for flag in extra)}`": (command, output)}
        if args.import_floor:
            commands.update({f"`{code}`": ([sys.executable, "-c", code], None) for code in IMPORT_FLOOR})
        seconds = {name: [] for name in commands}
        for name, (run, written) in commands.items():
            time_run(run, written)  # not counted: it fills the operating system's file cache
        for _ in range(args.runs):  # interleaved, so a slower moment of the machine hits every command alike
            for name, (run, written) in commands.items():
                seconds[name].append(time_run(run, written))

    print(f"Process start to exit, two {args.resolution}×{args.resolution} JPEGs for align, {args.runs} runs")
    rows = [
        [name, f"{statistics.median(times):.2f} s", f"{min(times):.2f} s", f"{max(times):.2f} s"]
        for name, times in seconds.items()
    ]
    print(metrics.markdown_table(("command", "median", "min", "max"), rows))


if __name__ == "__main__":
    main()
