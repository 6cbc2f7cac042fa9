"""The STN's own cost with latents given: this checkout against an earlier one, pair by pair in one process.

    git worktree add /tmp/stn_before <commit>
    taskset -c 0 python benchmarks/stn_speed_paired.py --baseline /tmp/stn_before --batch-sizes 1 8
    taskset -c 0 python benchmarks/stn_speed_paired.py --without-c     # the C build against PyTorch alone

The machine's speed drifts by tens of percent between runs, more than most code changes move the
STN, so two runs of `stn_speed.py` cannot compare code. Here both versions run in one process: the
baseline's package (``--baseline``, a checkout of this repository) is copied under another name and
imported beside this one, or (``--without-c``) the baseline is this checkout with its C build
switched off call by call. Both STNs load the same weights (``--pipeline``, default: the embedded
one), and each batch of the same encoded pairs goes through one version and then the other, the
order alternating, `--repeats` times. Reported per batch size: each version's median time per pair,
and the median of the per-batch ratios baseline / current (above 1: the current code is faster).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from stn_speed import encoded_pairs  # the same encoded pairs as benchmarks/stn_speed.py

from stn_diffusers import gauss_newton, metrics
from stn_diffusers.cli import load_pipeline

# The name the baseline's copy of the package is imported under.
BASELINE_PACKAGE = "stn_diffusers_baseline"


def import_baseline(checkout: Path, folder: Path):
    """The package of another checkout, copied into ``folder`` as :data:`BASELINE_PACKAGE` and imported."""
    source = checkout / "stn_diffusers"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"expected a checkout of this repository at {checkout} (with stn_diffusers/__init__.py)")
    shutil.copytree(source, folder / BASELINE_PACKAGE, ignore=shutil.ignore_patterns("weights", "assets"))
    sys.path.insert(0, str(folder))
    return importlib.import_module(BASELINE_PACKAGE)


class WithoutC:
    """This checkout's STN with the C build (``stn_diffusers._speedups``) switched off for each call."""

    def __init__(self, stn):
        self.stn = stn

    def predict_theta(self, *args):
        saved, gauss_newton._speedups = gauss_newton._speedups, None
        try:
            return self.stn.predict_theta(*args)
        finally:
            gauss_newton._speedups = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baseline_group = parser.add_mutually_exclusive_group(required=True)
    baseline_group.add_argument("--baseline", type=Path, help="a checkout of an earlier commit")
    baseline_group.add_argument(
        "--without-c", action="store_true", help="the baseline is this checkout with its C build switched off"
    )
    parser.add_argument("--pipeline", default=None, help="saved pipeline (default: the embedded one)")
    parser.add_argument("--data", default="data/photos/heldout")
    parser.add_argument("--num-pairs", type=int, default=24)
    parser.add_argument("--warp", default="standard")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline, "cpu")
    pairs, moving, reference = encoded_pairs(pipe, args.data, args.num_pairs, args.warp, args.seed)

    with tempfile.TemporaryDirectory() as folder:
        stn = pipe.stn.eval()
        if args.without_c:
            if gauss_newton._speedups is None:
                raise SystemExit("expected the C build (stn_diffusers._speedups) in this checkout; pip install -e .")
            before = WithoutC(stn)
        else:
            baseline = import_baseline(args.baseline, Path(folder))
            before = baseline.SpatialTransformer.from_config(stn.config).eval()
            before.load_state_dict(stn.state_dict())
        versions = {"baseline": before, "current": stn}
        rows = []
        with torch.inference_mode():
            for batch_size in args.batch_sizes:
                for model in versions.values():  # one-off costs (the grids' cached bases) out of the timings
                    model.predict_theta(moving[:batch_size], reference[:batch_size])
                seconds = {name: [] for name in versions}
                for repeat in range(args.repeats):
                    for index, start in enumerate(range(0, len(pairs), batch_size)):
                        order = list(versions.items())
                        if (index + repeat) % 2:
                            order.reverse()  # neither version always runs first
                        for name, model in order:
                            tick = time.perf_counter()
                            model.predict_theta(
                                moving[start : start + batch_size], reference[start : start + batch_size]
                            )
                            count = min(batch_size, len(pairs) - start)
                            seconds[name].append((time.perf_counter() - tick) / count)
                ratios = [b / c for b, c in zip(seconds["baseline"], seconds["current"])]
                rows.append([
                    str(batch_size),
                    metrics.format_milliseconds(statistics.median(seconds["baseline"])),
                    metrics.format_milliseconds(statistics.median(seconds["current"])),
                    f"{statistics.median(ratios):.2f}×",
                ])  # fmt: skip
    print(
        f"{len(pairs)} pairs, warp `{args.warp}`, {args.repeats} passes, {args.threads} thread(s), "
        f"baseline {'this checkout without its C build' if args.without_c else args.baseline}.\n"
    )
    print(metrics.markdown_table(["batch_size", "baseline / pair", "current / pair", "baseline / current"], rows))


if __name__ == "__main__":
    main()
