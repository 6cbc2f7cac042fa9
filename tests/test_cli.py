import json

import numpy as np
import PIL.Image
import pytest
import torch

from stn_diffusers import cli


@pytest.fixture
def saved_pipeline(tmp_path, registration_pipeline):
    folder = tmp_path / "pipeline"
    registration_pipeline.save_pretrained(folder)
    return folder


def test_align_writes_image_and_theta(tmp_path, saved_pipeline, coffee, astronaut, capsys):
    image, reference = tmp_path / "moving.png", tmp_path / "reference.jpg"
    coffee.save(image)
    astronaut.save(reference)
    # Both outputs go to folders that do not exist yet: the command makes them.
    output, theta_json = tmp_path / "out" / "aligned.png", tmp_path / "reports" / "theta.json"
    code = cli.main(
        ["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(reference),
         "--output", str(output), "--json", str(theta_json)]
    )  # fmt: skip
    assert code == 0
    assert PIL.Image.open(output).size == coffee.size  # the pixel warp keeps the image's own size
    report = json.loads(theta_json.read_text())
    theta = torch.tensor(report["theta"])
    assert theta.shape == (2, 3)
    pixels = np.array(report["pixel_matrix"])
    assert pixels.shape == (3, 3) and report["image_size"] == [400, 600]
    printed = capsys.readouterr().out
    assert "theta" in printed and "pixel matrix" in printed and str(output) in printed and str(theta_json) in printed


def test_align_decoded_writes_working_size(tmp_path, saved_pipeline, astronaut):
    image = tmp_path / "a.png"
    astronaut.save(image)
    output = tmp_path / "decoded.png"
    assert cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image),
                     "--output", str(output), "--decoded"]) == 0  # fmt: skip
    assert PIL.Image.open(output).size == (512, 512)


def test_align_reports_bad_files_clearly(tmp_path, saved_pipeline, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code = cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(broken), "--reference", str(broken),
                     "--output", str(tmp_path / "x.png")])  # fmt: skip
    assert code == 2
    assert "broken.png" in capsys.readouterr().err
    code = cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(tmp_path / "missing.png"),
                     "--output", str(tmp_path / "x.png")])  # fmt: skip
    assert code == 2
    assert "missing.png" in capsys.readouterr().err
