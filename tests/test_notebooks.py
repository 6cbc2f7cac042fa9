"""Execute every notebook top to bottom on tiny local models, offline; a failing cell fails the test."""

import json
import time
from pathlib import Path

import nbformat
import PIL.Image
import pytest
import skimage.data
from nbclient import NotebookClient

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline

from .conftest import TINY_REGISTRATION, make_tiny_vae

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
TIME_LIMIT_SECONDS = 60


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebook-pipeline")
    STNAlignmentPipeline(vae=make_tiny_vae(), stn=SpatialTransformer(**TINY_REGISTRATION)).save_pretrained(folder)
    return folder


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    resources = {"metadata": {"path": str(workdir)}}
    client = NotebookClient(notebook, timeout=TIME_LIMIT_SECONDS, kernel_name="python3", resources=resources)
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_SECONDS, f"{name} took {elapsed:.0f} s, expected under {TIME_LIMIT_SECONDS} s"
    return notebook


def outputs_of(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.fixture
def notebook_env(monkeypatch, tiny_pipeline_dir):
    # The kernel inherits this process's environment: offline, on the tiny pipeline, two threads.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("STN_DIFFUSERS_PIPELINE", str(tiny_pipeline_dir))
    # A notebook shows figures through the kernel's inline backend; MPLBACKEND=Agg would hide them.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return monkeypatch


def test_notebooks_are_committed_without_outputs():
    names = sorted(path.name for path in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_analyze_stn.ipynb", "03_finetune.ipynb"]
    for name in names:
        notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), name


def test_quickstart_aligns_and_shows_images(notebook_env, tmp_path):
    notebook = execute("01_quickstart.ipynb", tmp_path)
    outputs = outputs_of(notebook)
    printed = "".join(output.get("text", "") for output in outputs)
    assert "correlation reference" in printed and "mean corner motion" in printed
    assert any("image/png" in output.get("data", {}) for output in outputs)


def test_analyze_notebook_reports_inline(notebook_env, tmp_path):
    notebook_env.setenv("STN_DIFFUSERS_NUM_PAIRS", "4")
    notebook = execute("02_analyze_stn.ipynb", tmp_path)
    outputs = outputs_of(notebook)
    printed = "".join(output.get("text", "") for output in outputs)
    # The untrained registration design starts at identity: only its gates see the loss.
    assert "identity rate 100%" in printed and "['residual_gate']" in printed
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == len(list((tmp_path / "analysis-report").glob("*.png"))) == 5
    assert (tmp_path / "analysis-report" / "report.json").is_file()


def test_finetune_notebook_trains_and_plots_curves(notebook_env, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    PIL.Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.jpg")
    PIL.Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "stn.json").write_text(json.dumps(TINY_REGISTRATION))
    for name, value in (("VAE", tmp_path / "vae"), ("DATA", photos), ("STN_CONFIG", tmp_path / "stn.json"),
                        ("RESOLUTION", 128), ("STEPS", 4)):  # fmt: skip
        notebook_env.setenv(f"STN_DIFFUSERS_{name}", str(value))
    notebook = execute("03_finetune.ipynb", tmp_path)
    printed = "".join(output.get("text", "") for output in outputs_of(notebook))
    assert "saved pipeline" in printed and "val_corner_error" in printed
    assert (tmp_path / "finetune-run" / "model_index.json").is_file()
    assert (tmp_path / "finetune-run" / "training_curves.png").is_file()
