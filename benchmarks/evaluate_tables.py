"""Collect `stn-diffusers evaluate --json` reports into the tables of benchmarks/RESULTS.md.

    python benchmarks/evaluate_tables.py benchmarks/results/alignment_*.json > benchmarks/results/alignment.md

Each report becomes one table (the setting in its heading); several reports of the same setting
(e.g. classical baselines and STN pipelines measured in separate runs on the same seeded pairs) are
merged into one table, the first report of a method winning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stn_diffusers.evaluation import markdown_table


def merge_reports(paths: list[Path]) -> list[dict]:
    """Reports grouped by setting (pairs, resolution, warp, photometric, local change, seed), methods merged."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        loaded = json.loads(Path(path).read_text())
        # `evaluate --warp A,B` writes a list of reports; one warp, a single report.
        for report in loaded if isinstance(loaded, list) else [loaded]:
            _merge_one(merged, report)
    for report in merged.values():
        report["skipped"] = {k: v for k, v in report["skipped"].items() if k not in report["methods"]}
    return list(merged.values())


def _merge_one(merged: dict, report: dict) -> None:
    """Add one report's methods to the table of its setting (the first report of a method wins)."""
    key = (
        report["pairs"], report["resolution"], report["warp"], report["photometric"],
        report.get("local_change", 0.0), report.get("seed", 0),
    )  # fmt: skip
    target = merged.setdefault(key, {**report, "methods": {}, "skipped": {}})
    for name, summary in report["methods"].items():
        target["methods"].setdefault(name, summary)
    for name, reason in report.get("skipped", {}).items():
        target["skipped"].setdefault(name, reason)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by `stn-diffusers evaluate --json`")
    args = parser.parse_args(argv)
    for report in merge_reports(args.reports):
        print(f"#### `{report['warp']}` warp, photometric `{report['photometric']}`\n")
        print(markdown_table(report))
        print()


if __name__ == "__main__":
    main()
