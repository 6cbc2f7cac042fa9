"""`align` over many pairs: pair lists, batches, errors, resuming, and two processes under torchrun.

The bookkeeping (which pair went where, batches, resuming) is tested with a stand-in aligner whose θ
says which pair it saw; the command line end to end with a tiny saved pipeline, at a working size of
128 px so that every call takes milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, batch_align, cli, geometry

from .conftest import TINY_REGISTRATION, make_tiny_vae

REPO_ROOT = Path(__file__).resolve().parents[1]
# The tiny registration STN at 16 latents per side: images are encoded at 128 px on the longer side.
SMALL_STN = {**TINY_REGISTRATION, "sample_size": 16}


def save_small_pipeline(folder: Path) -> Path:
    """A pipeline of the tiny VAE and the small STN, saved to ``folder``."""
    torch.manual_seed(0)
    STNAlignmentPipeline(vae=make_tiny_vae(), stn=SpatialTransformer(**SMALL_STN)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory) -> Path:
    return save_small_pipeline(tmp_path_factory.mktemp("pipeline") / "pipeline")


def shifted_pair(dx: int, dy: int = 0, size: tuple[int, int] = (160, 128)) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """``(moving, reference)`` crops of the astronaut, the moving one's content moved by ``(-dx, -dy)`` px:
    the pixel matrix that aligns it has translation ``(-dx, -dy)``."""
    photo = PIL.Image.fromarray(skimage.data.astronaut())
    left, top = 100, 60
    reference = photo.crop((left, top, left + size[0], top + size[1]))
    moving = photo.crop((left + dx, top + dy, left + dx + size[0], top + dy + size[1]))
    return moving, reference


def read_results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / batch_align.RESULTS_FILE).read_text().splitlines()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------ a stand-in aligner
class GreyLevelAligner:
    """Stands in for the pipeline where only the bookkeeping is tested: θ's x-translation is the mean
    grey level of the image minus that of its reference (0 for a pair matched right, and a pair's own
    value otherwise), every call's pairs are recorded, and an all-black image is refused."""

    device = torch.device("cpu")
    stn = SimpleNamespace(config=SimpleNamespace(conditioning="reference"))

    def __init__(self):
        self.calls: list[list[tuple[float, tuple[int, int]]]] = []  # each call: (grey level, reference size)

    @staticmethod
    def working_size(size: tuple[int, int]) -> tuple[int, int]:
        return size  # one working size per reference size

    def __call__(self, images, reference, ignore_mask=None, batch_size=8, decode=False, **options):
        if any(np.asarray(image).max() == 0 for image in images):
            raise ValueError("expected an image with some content, got an all-black one")
        levels = [float(np.asarray(image).mean()) for image in images]
        self.calls.append([(level, ref.size) for level, ref in zip(levels, reference)])
        theta = geometry.identity_theta(len(images)).clone()
        theta[:, 0, 2] = torch.tensor([level - float(np.asarray(ref).mean()) for level, ref in zip(levels, reference)])
        count = len(images)
        return SimpleNamespace(
            theta=theta, warped_images=list(images), images=None, displacement=torch.zeros(count),
            unwarped=torch.zeros(count, dtype=torch.bool), refined=None, confidence=torch.ones(count),
        )  # fmt: skip


def grey(level: int, size: tuple[int, int] = (32, 24)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, (level, level, level))


def write_pairs_csv(folder: Path, rows: list[tuple[str, ...]], header: str = "image,reference,mask") -> Path:
    path = folder / "pairs.csv"
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


@pytest.fixture
def grey_pairs(tmp_path) -> tuple[batch_align.PairList, Path]:
    """Seven pairs of flat grey images, image and reference of one level per pair (so that θ is 0
    when they are matched right), two sizes, listed in a CSV."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    rows = []
    for index in range(7):
        size = (32, 24) if index % 3 else (40, 24)
        grey(10 + 20 * index, size).save(folder / f"moving{index}.png")
        grey(10 + 20 * index, size).save(folder / f"reference{index}.png")
        rows.append((f"moving{index}.png", f"reference{index}.png", ""))
    return batch_align.pairs_from_csv(write_pairs_csv(folder, rows)), tmp_path / "out"


# ------------------------------------------------------------------------------------ pair lists
class TestPairLists:
    def test_csv_paths_are_relative_to_its_folder_and_the_mask_is_optional(self, tmp_path):
        (tmp_path / "lists" / "photos").mkdir(parents=True)
        for name in ("a.png", "b.png"):
            grey(50).save(tmp_path / "lists" / "photos" / name)
        PIL.Image.new("L", (32, 24), 0).save(tmp_path / "lists" / "photos" / "mask.png")
        absolute = tmp_path / "elsewhere.png"
        grey(50).save(absolute)
        rows = [("photos/a.png", "photos/b.png", "photos/mask.png"), (str(absolute), "photos/b.png", "")]
        pairs = batch_align.pairs_from_csv(write_pairs_csv(tmp_path / "lists", rows))
        assert [(e.index, e.image, e.mask) for e in pairs.entries] == [
            (0, "photos/a.png", "photos/mask.png"), (1, str(absolute), None),
        ]  # fmt: skip
        first, second = pairs.load(pairs.entries[0]), pairs.load(pairs.entries[1])
        assert first.ignore_mask.shape == (1, 24, 32) and second.ignore_mask is None
        assert first.image.mode == "RGB" and second.image.size == (32, 24)

    def test_a_csv_without_the_columns_is_refused_naming_them(self, tmp_path):
        with pytest.raises(ValueError, match="image,reference.*moving,target"):
            batch_align.pairs_from_csv(write_pairs_csv(tmp_path, [("a.png", "b.png")], header="moving,target"))
        with pytest.raises(FileNotFoundError, match="CSV of pairs"):
            batch_align.pairs_from_csv(tmp_path / "missing.csv")
        with pytest.raises(ValueError, match="at least one pair"):
            batch_align.pairs_from_csv(write_pairs_csv(tmp_path, []))

    def test_folders_pair_files_of_the_same_relative_path(self, tmp_path):
        moving, references = tmp_path / "moving", tmp_path / "references"
        for folder in (moving / "nested", references / "nested"):
            folder.mkdir(parents=True)
        for name, level in (("b.png", 30), ("a.png", 90), ("nested/c.png", 150)):
            grey(level).save(moving / name)
            grey(level).save(references / name)
        grey(200).save(moving / "lonely.png")  # no reference of that name
        pairs = batch_align.pairs_from_folders(moving, references)
        assert [e.image for e in pairs.entries] == ["a.png", "b.png", "lonely.png", "nested/c.png"]
        aligner = GreyLevelAligner()
        summary = batch_align.align_pairs(aligner, pairs, tmp_path / "out", progress=False)
        records = read_results(tmp_path / "out")
        assert [r["index"] for r in records] == [0, 1, 2, 3]
        # Matched right: every image met the reference of its own grey level.
        assert all(r["theta"][0][2] == 0 for r in records if "error" not in r)
        assert "lonely.png" in records[2]["error"] and "reference" in records[2]["error"]
        assert (summary["ok"], summary["failed"]) == (3, 1)


# ------------------------------------------------------------------------------------- batches
class TestAlignPairs:
    def test_calls_hold_at_most_batch_size_pairs_of_one_working_size(self, grey_pairs):
        pairs, output = grey_pairs
        aligner = GreyLevelAligner()
        batch_align.align_pairs(aligner, pairs, output, batch_size=3, progress=False)
        assert sum(len(call) for call in aligner.calls) == 7
        assert all(len(call) <= 3 and len({sizes[1] for sizes in call}) == 1 for call in aligner.calls)
        records = read_results(output)
        assert [r["index"] for r in records] == list(range(7))
        assert all(r["theta"][0][2] == 0 for r in records)  # each record is its own pair's
        for record in records:
            saved = PIL.Image.open(output / record["output"])
            assert saved.size == (record["image_size"][1], record["image_size"][0])
            assert np.asarray(saved).mean() == 10 + 20 * record["index"]

    def test_a_pair_the_pipeline_refuses_fails_alone(self, grey_pairs):
        pairs, output = grey_pairs
        grey(0, (32, 24)).save(output.parent / "inputs" / "moving1.png")  # all black: refused by the aligner
        aligner = GreyLevelAligner()
        summary = batch_align.align_pairs(aligner, pairs, output, batch_size=8, progress=False)
        records = read_results(output)
        assert "all-black" in records[1]["error"] and "theta" not in records[1]
        assert [r["index"] for r in records if "error" not in r] == [0, 2, 3, 4, 5, 6]
        assert not (output / pairs.entries[1].output_name).exists()
        assert (summary["ok"], summary["failed"], summary["skipped"]) == (6, 1, 0)
        assert summary["errors"] == [{"index": 1, "error": records[1]["error"]}]

    def test_skip_existing_after_an_interruption_aligns_each_missing_pair_once(self, grey_pairs):
        pairs, output = grey_pairs
        batch_align.align_pairs(GreyLevelAligner(), pairs, output, progress=False)
        lines = (output / batch_align.RESULTS_FILE).read_text().splitlines()
        # A two-process run killed mid-write: merged records 0 and 1, then a line cut short (2); process
        # 0's shard holds 3 and half of 4, process 1's holds 5. Pairs 2, 4 and 6 are left to do.
        (output / batch_align.RESULTS_FILE).write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:30])
        (output / "results.rank0.jsonl").write_text(lines[3] + "\n" + lines[4][:-20])
        (output / "results.rank1.jsonl").write_text(lines[5] + "\n")
        (output / batch_align.SUMMARY_FILE).unlink()

        aligner = GreyLevelAligner()
        summary = batch_align.align_pairs(aligner, pairs, output, batch_size=2, skip_existing=True, progress=False)
        levels = sorted(level for call in aligner.calls for level, _ in call)
        assert levels == [10 + 20 * index for index in (2, 4, 6)]
        records = read_results(output)  # every line a whole record
        assert [r["index"] for r in records] == list(range(7))
        assert sorted(path.name for path in output.glob("results*")) == [batch_align.RESULTS_FILE]
        assert (summary["ok"], summary["failed"], summary["skipped"]) == (3, 0, 4)

        # Resuming a finished run aligns nothing and keeps every record.
        aligner = GreyLevelAligner()
        summary = batch_align.align_pairs(aligner, pairs, output, skip_existing=True, progress=False)
        assert aligner.calls == [] and summary["skipped"] == 7 and read_results(output) == records

    @pytest.mark.skipif(sys.platform == "win32", reason="no advisory file locks")
    def test_a_run_does_not_start_while_a_shard_is_being_written(self, grey_pairs):
        import fcntl

        pairs, output = grey_pairs
        output.mkdir()
        with (output / "results.rank1.jsonl").open("a") as writer:  # a worker of an earlier run, still running
            fcntl.flock(writer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ValueError, match="results.rank1.jsonl is locked by a running"):
                batch_align.align_pairs(GreyLevelAligner(), pairs, output, skip_existing=True, progress=False)
        assert not (output / "results.rank0.jsonl").exists()  # refused before anything was written
        batch_align.align_pairs(GreyLevelAligner(), pairs, output, skip_existing=True, progress=False)
        assert [r["index"] for r in read_results(output)] == list(range(7))

    def test_earlier_results_or_outputs_are_refused_without_skip_existing(self, grey_pairs):
        pairs, output = grey_pairs
        batch_align.align_pairs(GreyLevelAligner(), pairs, output, progress=False)
        before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
        with pytest.raises(ValueError, match="results.jsonl.*--skip-existing"):
            batch_align.align_pairs(GreyLevelAligner(), pairs, output, progress=False)
        (output / batch_align.RESULTS_FILE).unlink()
        with pytest.raises(ValueError, match="000000_moving0.png.*and 6 more"):
            batch_align.align_pairs(GreyLevelAligner(), pairs, output, progress=False)
        assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == {
            name: mtime for name, mtime in before.items() if name != batch_align.RESULTS_FILE
        }

    def test_an_output_never_replaces_an_input(self, tmp_path):
        folder = tmp_path / "photos"
        (folder / "moving").mkdir(parents=True)
        grey(40).save(folder / "moving" / "x.png")
        grey(40).save(folder / "000000_x.png")
        # The output of pair 0 (image x.png) is named 000000_x.png: in this folder, its reference.
        pairs = batch_align.pairs_from_csv(write_pairs_csv(folder, [("moving/x.png", "000000_x.png", "")]))
        batch_align.align_pairs(GreyLevelAligner(), pairs, folder, skip_existing=True, progress=False)
        (record,) = read_results(folder)
        assert "differ from the input" in record["error"]
        assert np.asarray(PIL.Image.open(folder / "000000_x.png")).mean() == 40


# -------------------------------------------------------------------------------- command line
class TestCommandLine:
    def test_pairs_csv_writes_aligned_images_records_and_a_summary(self, tmp_path, small_pipeline, capsys):
        photos = tmp_path / "photos"
        photos.mkdir()
        shifts = [(6, 0), (0, 4), (-5, 3)]
        for index, (dx, dy) in enumerate(shifts):
            moving, reference = shifted_pair(dx, dy)
            moving.save(photos / f"moving{index}.png")
            reference.save(photos / f"reference{index}.png")
        rows = [(f"photos/moving{i}.png", f"photos/reference{i}.png") for i in range(len(shifts))]
        csv = write_pairs_csv(tmp_path, rows, header="image,reference")
        output = tmp_path / "aligned"
        argv = ["align", "--pipeline", str(small_pipeline), "--pairs", str(csv), "--output-dir", str(output),
                "--refine", "ecc", "--batch-size", "2"]  # fmt: skip
        assert cli.main(argv) == 0

        records = read_results(output)
        assert [r["index"] for r in records] == [0, 1, 2]
        for record, (dx, dy) in zip(records, shifts):
            # ECC from the STN's estimate finds each pair's own shift: records are not swapped in a batch.
            matrix = np.array(record["pixel_matrix"])
            assert record["refined"] is True and 0.5 <= record["confidence"] <= 1
            np.testing.assert_allclose(matrix[:2, 2], [-dx, -dy], atol=0.2)
            assert record["image_size"] == [128, 160] and np.array(record["theta"]).shape == (2, 3)
            assert PIL.Image.open(output / record["output"]).size == (160, 128)
        summary = json.loads((output / batch_align.SUMMARY_FILE).read_text())
        assert (summary["ok"], summary["failed"], summary["skipped"], summary["num_pairs"]) == (3, 0, 0, 3)
        assert summary["pairs_per_second"] > 0 and summary["num_processes"] == 1
        printed = capsys.readouterr().out
        assert "aligned 3 pair(s), 0 failed" in printed and str(output / batch_align.RESULTS_FILE) in printed

    @pytest.fixture
    def bad_pairs_csv(self, tmp_path) -> Path:
        """Pairs 0 and 4 good (4 with an ignore mask), 1 a missing file, 2 not an image, 3 a mask of another size."""
        moving, reference = shifted_pair(4)
        moving.save(tmp_path / "moving.png")
        reference.save(tmp_path / "reference.png")
        (tmp_path / "broken.png").write_text("not an image")
        PIL.Image.new("L", (80, 64), 0).save(tmp_path / "small_mask.png")
        mask = np.zeros((128, 160), np.uint8)
        mask[:40, :40] = 255
        PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
        rows = [("moving.png", "reference.png", ""), ("missing.png", "reference.png", ""),
                ("broken.png", "reference.png", ""), ("moving.png", "reference.png", "small_mask.png"),
                ("moving.png", "reference.png", "mask.png")]  # fmt: skip
        return write_pairs_csv(tmp_path, rows)

    def test_bad_pairs_are_recorded_and_the_rest_aligned(self, tmp_path, small_pipeline, bad_pairs_csv, capsys):
        output = tmp_path / "out"
        argv = ["align", "--pipeline", str(small_pipeline), "--pairs", str(bad_pairs_csv), "--output-dir", str(output)]
        assert cli.main(argv) == 0
        records = read_results(output)
        assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
        assert "missing.png" in records[1]["error"] and "broken.png" in records[2]["error"]
        assert "mask at the reference's size, 160×128" in records[3]["error"] and "80×64" in records[3]["error"]
        assert all("error" not in records[i] and (output / records[i]["output"]).is_file() for i in (0, 4))
        assert records[4]["mask"] == "mask.png"
        assert sorted(p.name for p in output.glob("*.png")) == [records[0]["output"], records[4]["output"]]
        printed = capsys.readouterr().out
        assert "aligned 2 pair(s), 3 failed" in printed and "failed: pair 1:" in printed

    def test_strict_stops_at_the_first_bad_pair(self, tmp_path, small_pipeline, bad_pairs_csv, capsys):
        output = tmp_path / "out"
        argv = ["align", "--pipeline", str(small_pipeline), "--pairs", str(bad_pairs_csv), "--output-dir", str(output),
                "--strict", "--batch-size", "1"]  # fmt: skip
        assert cli.main(argv) == 2
        err = capsys.readouterr().err  # after the progress bars, one error line and no traceback
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "pair 1" in line and "missing.png" in line and "Traceback" not in err
        assert [p.name for p in output.glob("*.png")] == ["000000_moving.png"]  # nothing after pair 1
        assert not (output / batch_align.RESULTS_FILE).exists()
        # What it recorded before stopping is kept, and a resumed run without --strict finishes the rest.
        assert cli.main([*argv[:-3], "--skip-existing"]) == 0
        assert [r["index"] for r in read_results(output)] == [0, 1, 2, 3, 4]

    @pytest.mark.parametrize(
        "extra, expected",
        [
            (["--pairs", "{tmp}/p.csv", "--output", "{tmp}/a.png"], ["--output", "only with --image"]),
            (["--pairs", "{tmp}/p.csv"], ["--output-dir"]),
            (["--image", "{tmp}/a.png", "--output", "{tmp}/b.png", "--output-dir", "{tmp}/out"],
             ["--output-dir", "--pairs"]),
            (["--image-dir", "{tmp}", "--output-dir", "{tmp}/out"], ["--reference-dir"]),
            (["--pairs", "{tmp}/p.csv", "--image-column", "x", "--output-dir", "{tmp}/out"],
             ["--image-column", "--pairs"]),
            (["--dataset", "{tmp}", "--output-dir", "{tmp}/out"], ["--image-column", "--reference-column"]),
            (["--pairs", "{tmp}/missing.csv", "--output-dir", "{tmp}/out"], ["CSV of pairs", "missing.csv"]),
            (["--pairs", "{tmp}/p.csv", "--output-dir", "{tmp}/p.csv"], ["--output-dir", "p.csv", "folder"]),
        ],
    )  # fmt: skip
    def test_flag_mistakes_are_one_line_before_loading(self, tmp_path, monkeypatch, capsys, extra, expected):
        def fail_if_loaded(*args, **kwargs):
            raise AssertionError("the pipeline was loaded before the mistake was reported")

        monkeypatch.setattr(cli, "load_pipeline", fail_if_loaded)
        write_pairs_csv(tmp_path, [("a.png", "b.png")], header="image,reference").rename(tmp_path / "p.csv")
        assert cli.main(["align", *(arg.format(tmp=tmp_path) for arg in extra)]) == 2
        line = _one_error_line(capsys)
        assert all(word in line for word in expected), line
        assert not (tmp_path / "out").exists()

    def test_two_processes_under_torchrun_record_every_pair_once_in_order(self, tmp_path, small_pipeline):
        folder = tmp_path / "photos"
        folder.mkdir()
        rows = []
        for index in range(5):
            moving, reference = shifted_pair(index - 2)
            moving.save(folder / f"m{index}.png")
            reference.save(folder / f"r{index}.png")
            rows.append((f"photos/m{index}.png", f"photos/r{index}.png"))
        rows.insert(3, ("photos/missing.png", "photos/r0.png"))  # a failure on one process or the other
        csv = write_pairs_csv(tmp_path, rows, header="image,reference")
        output = tmp_path / "aligned"
        # --standalone: a free port on this machine, so that runs side by side never collide.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                   "stn_diffusers.cli", "align", "--pipeline", str(small_pipeline), "--pairs", str(csv),
                   "--output-dir", str(output), "--batch-size", "2"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        records = read_results(output)
        assert [r["index"] for r in records] == list(range(6))
        assert [r["image"] for r in records] == [row[0] for row in rows]
        assert "missing.png" in records[3]["error"]
        assert sorted(path.name for path in output.glob("results*")) == [batch_align.RESULTS_FILE]
        summary = json.loads((output / batch_align.SUMMARY_FILE).read_text())
        assert (summary["num_processes"], summary["ok"], summary["failed"]) == (2, 5, 1)
        assert result.stdout.count("aligned 5 pair(s)") == 1  # the main process alone prints the summary
