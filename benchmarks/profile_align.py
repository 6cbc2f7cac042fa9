"""Where the time of one ``stn-diffusers align`` goes, stage by stage, from process start to written image.

    python benchmarks/profile_align.py                       # the embedded default, 512×512, one thread
    python benchmarks/profile_align.py --pipeline DIR --threads 2 --resolution 768

The command runs in this process exactly as ``stn-diffusers align --threads N`` runs it, once, cold (a
fresh process, nothing loaded), on the two JPEG files that ``benchmarks/cold_start.py`` times the
command on: a seeded pair cut from the photos bundled with the package. Each stage is timed by
wrapping the one function that does it:

    process start   starting Python itself (``python -c pass``, timed apart: median of 3)
    imports         torch, stn_diffusers and diffusers: everything the command imports
    pipeline load   ``load_pipeline`` (``from_pretrained`` of the saved folder)
    image files     ``load_image``: reading and decoding both files
    to tensors      the decoded images as float tensors (``to_rgb_list``)
    resize          to the working size, then to ``[-1, 1]`` (``_resize``, ``VaeImageProcessor.preprocess``)
    encode          the VAE encoder (``STNAlignmentPipeline.encode``)
    STN             θ from the latents (``STNAlignmentPipeline.predict_theta``)
    pixel warp      the original image warped by θ at full resolution (``_warp_originals``)
    save            writing the output file (``files.write_outputs``)
    rest            everything else inside the command: checks, the latent warp, printing θ

The wrapped names are the implementation's own, private ones among them: rename them here when they move.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the align path imports, loaded here so that "imports" holds all of it and "pipeline load" only the load.
ALIGN_IMPORTS = ("stn_diffusers.cli", "stn_diffusers.pipelines", "diffusers")


def process_start_seconds(runs: int = 3) -> float:
    """Median seconds to start this Python and run nothing (``python -c pass``): what every command
    pays before its first import. Timed in child processes, as this one has already started."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


class StageTimer:
    """Wraps functions so that each call adds its seconds to a stage; :meth:`restore` unwraps them all."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._wrapped: list[tuple[object, str, object]] = []

    def wrap(self, stage: str, owner: object, name: str) -> None:
        function = getattr(owner, name)
        self.seconds.setdefault(stage, 0.0)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        self._wrapped.append((owner, name, function))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, function in reversed(self._wrapped):
            setattr(owner, name, function)
        self._wrapped.clear()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the two square inputs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the command's --threads)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import_start = time.perf_counter()
    for module in ALIGN_IMPORTS:
        importlib.import_module(module)
    import_seconds = time.perf_counter() - import_start

    from cold_start import write_pair  # the sibling benchmark's inputs: the same pair, the same files
    from diffusers.image_processor import VaeImageProcessor

    from stn_diffusers import cli, files, metrics
    from stn_diffusers.pipelines import pipeline_stn_alignment as pipeline_module

    timer = StageTimer()
    timer.wrap("pipeline load", cli, "load_pipeline")
    timer.wrap("image files", cli, "load_image")
    timer.wrap("to tensors", pipeline_module, "to_rgb_list")
    timer.wrap("resize", pipeline_module, "_resize")
    timer.wrap("resize", VaeImageProcessor, "preprocess")
    timer.wrap("encode", pipeline_module.STNAlignmentPipeline, "encode")
    timer.wrap("STN", pipeline_module.STNAlignmentPipeline, "predict_theta")
    timer.wrap("pixel warp", pipeline_module.STNAlignmentPipeline, "_warp_originals")
    timer.wrap("save", files, "write_outputs")

    with tempfile.TemporaryDirectory() as tmp:
        reference, moving = write_pair(Path(tmp), args.resolution)
        argv = ["align", "--image", str(moving), "--reference", str(reference), "--output", str(Path(tmp) / "out.png"),
                "--threads", str(args.threads)]  # fmt: skip
        if args.pipeline is not None:
            argv += ["--pipeline", args.pipeline]
        printed = io.StringIO()
        command_start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            code = cli.main(argv)
        command_seconds = time.perf_counter() - command_start
        timer.restore()
        started = process_start_seconds()
        if code != 0:
            raise SystemExit(f"stn-diffusers align failed (exit status {code}):\n{printed.getvalue()}")

    stages = {"process start": started, "imports": import_seconds, **timer.seconds}
    stages["rest"] = command_seconds - sum(timer.seconds.values())
    total = sum(stages.values())
    rows = [
        [stage, metrics.format_milliseconds(seconds), f"{seconds / total:.0%}"] for stage, seconds in stages.items()
    ]
    rows.append(["**total, process start to written image**", f"**{metrics.format_milliseconds(total)}**", "100%"])
    print(
        f"`stn-diffusers align` at {args.resolution}×{args.resolution}, {args.threads} thread(s), "
        f"pipeline {args.pipeline or 'embedded default'}, Python {platform.python_version()}"
    )
    print(metrics.markdown_table(("stage", "time", "share"), rows))


if __name__ == "__main__":
    main()
