import json
import statistics
from pathlib import Path

import PIL.Image
import pytest

from stn_diffusers import cli, demo, files, load_default, metrics
from stn_diffusers.default import DEFAULT_PIPELINE_DIR
from stn_diffusers.pipelines.pipeline_stn_alignment import vae_fingerprint


def test_embedded_default_loads_offline_in_fp16_files():
    weights = sorted(DEFAULT_PIPELINE_DIR.rglob("*.safetensors"))
    assert {path.parent.name for path in weights} == {"vae", "stn"}
    assert sum(path.stat().st_size for path in weights) < 8 * 2**20  # a few MB: fp16
    pipe = load_default()
    assert pipe.stn.config.conditioning == "reference"
    # The STN records the VAE it was trained for, and it is the VAE it ships with.
    assert pipe.stn.config.vae_fingerprint == vae_fingerprint(pipe.vae)


def test_demo_writes_grid_table_and_beats_identity(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(output)]) == 0
    written = {path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file()}
    aligned = {f"aligned/{name}.png" for name in ("astronaut", "coffee", "chelsea", "aloe")}
    assert written == {"grid.png", "results.md", "results.json", *aligned}  # and no temporary file
    assert PIL.Image.open(output / "grid.png").size == (5 * 256, 4 * 256)
    summary = json.loads((output / "results.json").read_text())
    synthetic = [row for row in summary["rows"] if row["errors"]]
    assert len(synthetic) == 3
    identity = statistics.median(row["errors"]["identity"] for row in synthetic)
    stn = statistics.median(row["errors"]["stn"] for row in synthetic)
    assert stn * 5 <= identity, (stn, identity)
    # The summary speaks evaluate's vocabulary, over the same synthetic pairs.
    stn_summary = summary["summary"]["stn"]
    assert stn_summary["median"] == metrics.summarize_errors([row["errors"]["stn"] for row in synthetic])["median"]
    assert {"under_1px", "under_5px", "seconds_per_pair", "seconds_per_pair_with_encode"} <= set(stn_summary)
    # Timed like evaluate: estimation with the latents given, and with both encodes on top.
    for row in summary["rows"]:
        assert 0 < row["seconds"]["stn"] < row["seconds_with_encode"]["stn"], row["name"]
    printed = capsys.readouterr().out
    assert "grid.png" in printed and "| astronaut |" in printed
    assert f"stn {metrics.TIME_PER_PAIR}" in printed and f"stn {metrics.TIME_PER_PAIR_WITH_ENCODE}" in printed


def test_write_results_writes_every_file_or_none(tmp_path, monkeypatch):
    output = tmp_path / "demo"
    (output / demo.ALIGNED_FOLDER).mkdir(parents=True)
    (output / demo.RESULTS_MARKDOWN).write_text("the previous table")
    aligned = {name: PIL.Image.new("RGB", (8, 8), colour) for name, colour in (("a", "red"), ("b", "blue"))}
    grid = PIL.Image.new("RGB", (16, 8), "white")
    image_writer = files.image_writer

    def failing_for_grid(picture, path):
        if Path(path).name != demo.GRID_FILE:
            return image_writer(picture, path)

        def fail(partial):  # the aligned images before it are already written to their temporary files
            partial.write_bytes(b"half a png")
            raise OSError("disk full")

        return fail

    monkeypatch.setattr(files, "image_writer", failing_for_grid)
    with pytest.raises(OSError, match="disk full"):
        demo.write_results(output, aligned, grid, "| table |", {"rows": []})
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*")) == ["aligned", "results.md"]
    assert (output / demo.RESULTS_MARKDOWN).read_text() == "the previous table"

    monkeypatch.setattr(files, "image_writer", image_writer)
    demo.write_results(output, aligned, grid, "| table |", {"rows": []})
    with PIL.Image.open(output / "aligned" / "b.png") as written:
        assert written.getpixel((0, 0)) == (0, 0, 255)
    assert (output / demo.RESULTS_MARKDOWN).read_text() == "| table |"
    assert json.loads((output / demo.RESULTS_JSON).read_text()) == {"rows": []}
