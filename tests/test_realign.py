"""Re-aligning an edit model's output onto its input: `realign_edit` and `stn-diffusers realign`."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from stn_diffusers import (
    RealignEditOutput,
    SpatialTransformer,
    STNAlignmentPipeline,
    cli,
    data,
    geometry,
    realign_edit,
    refine,
)
from stn_diffusers.realign import FOUND_REGION_ECC_MARGIN
from tests.conftest import TINY_SEARCH_REFINE

SIZE = 256
# An edit model's typical motion: zoomed in by 3 %, shifted by 2 % and 1 % of the side.
EDIT_THETA = torch.tensor([[[1.03, 0.0, 0.04], [0.0, 1.03, -0.02]]])


@pytest.fixture
def pipe(tiny_vae) -> STNAlignmentPipeline:
    torch.manual_seed(0)
    return STNAlignmentPipeline(vae=tiny_vae, stn=SpatialTransformer(**TINY_SEARCH_REFINE))


@pytest.fixture(scope="module")
def edit(astronaut) -> dict:
    """A simulated edit of the astronaut: the output zoomed and shifted, a patch of another photo pasted."""
    source = torch.from_numpy(np.asarray(astronaut, dtype=np.float32) / 255).permute(2, 0, 1)
    generator = torch.Generator().manual_seed(0)
    original, edited = data.make_pair(source, SIZE, EDIT_THETA, generator)
    edited, changed = data.paste_local_change(edited, source.flip(-1).flip(-2), 0.15, generator)
    mask = geometry.warp(changed[None], EDIT_THETA, mode="nearest")[0]  # the edit, in the original's frame
    return {"original": original, "edited": edited, "mask": mask}


def corner_error(theta: torch.Tensor) -> float:
    return float(geometry.corner_error(theta[:, :2], EDIT_THETA, SIZE, SIZE))


class TestRealignEdit:
    def test_a_known_theta_warps_the_edit_onto_the_original(self, edit):
        out = realign_edit(edit["edited"], edit["original"], theta=EDIT_THETA, output_type="pt")
        assert isinstance(out, RealignEditOutput) and out.image.shape == (3, SIZE, SIZE)
        expected = geometry.warp(edit["edited"][None], EDIT_THETA, mode="bicubic")[0].clamp(0, 1)
        torch.testing.assert_close(out.image, expected)
        assert out.refined is None and out.confidence is None

    def test_paste_back_keeps_the_original_outside_the_edit(self, edit):
        out = realign_edit(
            edit["edited"], edit["original"], edit["mask"], theta=EDIT_THETA, paste_back=True, feather=2.0,
            output_type="pt",
        )  # fmt: skip
        # Far from the seam (the mask shrunk and grown by 8 px): the original outside, the edit inside.
        shrunk = -torch.nn.functional.max_pool2d(-edit["mask"][None], 17, stride=1, padding=8)[0]
        grown = torch.nn.functional.max_pool2d(edit["mask"][None], 17, stride=1, padding=8)[0]
        outside, inside = (grown < 0.5).expand(3, -1, -1), (shrunk > 0.5).expand(3, -1, -1)
        torch.testing.assert_close(out.image[outside], edit["original"][outside], atol=1e-6, rtol=0)
        aligned = realign_edit(edit["edited"], edit["original"], theta=EDIT_THETA, output_type="pt").image
        torch.testing.assert_close(out.image[inside], aligned[inside], atol=1e-6, rtol=0)
        # In between, a blend: the seam is feathered, not cut.
        seam = ((grown > 0.5) & (shrunk < 0.5)).expand(3, -1, -1)
        on_seam = out.edit_mask[seam[:1]]
        assert ((on_seam > 0.1) & (on_seam < 0.9)).float().mean() > 0.2

    def test_estimates_the_motion_with_the_edit_mask(self, pipe, edit):
        out = realign_edit(edit["edited"], edit["original"], edit["mask"], pipeline=pipe, output_type="pt")
        assert corner_error(out.theta) < 0.5 and out.refined is True

    def test_finds_the_edited_region_without_a_mask(self, pipe, edit):
        out = realign_edit(edit["edited"], edit["original"], pipeline=pipe, paste_back=True, output_type="pt")
        assert corner_error(out.theta) < 0.5
        found, truth = out.edit_mask >= 0.5, edit["mask"] >= 0.5
        assert (found & truth).sum() / truth.sum() > 0.9  # the edit is inside the region found
        assert found.float().mean() < 2 * truth.float().mean()  # and the region is not the whole picture

    def test_the_found_region_gets_its_own_ecc_margin(self, pipe, edit, monkeypatch):
        margins, refine_theta_ecc = [], refine.refine_theta_ecc

        def spy(*args, **kwargs):
            margins.append(kwargs.get("mask_margin"))
            return refine_theta_ecc(*args, **kwargs)

        monkeypatch.setattr(refine, "refine_theta_ecc", spy)
        realign_edit(edit["edited"], edit["original"], pipeline=pipe, output_type="pt")
        assert margins == [None, FOUND_REGION_ECC_MARGIN] and FOUND_REGION_ECC_MARGIN < refine.ECC_MASK_MARGIN

    def test_output_types(self, edit):
        kwargs = {"theta": EDIT_THETA}
        assert isinstance(realign_edit(edit["edited"], edit["original"], **kwargs).image, PIL.Image.Image)
        assert realign_edit(edit["edited"], edit["original"], output_type="np", **kwargs).image.shape == (SIZE, SIZE, 3)


class TestBadInputs:
    def test_edit_mask_of_the_wrong_size_names_the_expected_size(self, edit):
        with pytest.raises(ValueError, match=f"edit_mask of the original's size, {SIZE}×{SIZE}.*got 128×128"):
            realign_edit(edit["edited"], edit["original"], torch.zeros(1, 128, 128), theta=EDIT_THETA)

    def test_edit_mask_with_the_wrong_channels(self, edit):
        with pytest.raises(ValueError, match="edit_mask with 1 .* or 3"):
            realign_edit(edit["edited"], edit["original"], np.zeros((SIZE, SIZE, 5), np.float32), theta=EDIT_THETA)

    def test_a_mask_that_covers_everything_is_refused(self, edit):
        with pytest.raises(ValueError, match="leave some of the original unedited"):
            realign_edit(edit["edited"], edit["original"], torch.ones(1, SIZE, SIZE), theta=EDIT_THETA)

    @pytest.mark.parametrize("shape", [(1, 3, 2), (2, 2, 3), (6,), (1, 2, 2)])
    def test_theta_of_the_wrong_shape(self, edit, shape):
        with pytest.raises(ValueError, match=r"theta of shape \(1, 2, 3\) or \(1, 3, 3\)"):
            realign_edit(edit["edited"], edit["original"], theta=torch.zeros(shape))

    @pytest.mark.parametrize("option, value, expected", [
        ("output_type", "latent", "output_type in"), ("feather", -1.0, "feather >= 0"),
    ])  # fmt: skip
    def test_bad_options(self, edit, option, value, expected):
        with pytest.raises(ValueError, match=expected):
            realign_edit(edit["edited"], edit["original"], theta=EDIT_THETA, **{option: value})


class TestCli:
    def _save(self, tmp_path, edit) -> tuple:
        def png(tensor, name):
            path = tmp_path / name
            array = (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
            return str(path)

        return png(edit["edited"], "edited.png"), png(edit["original"], "original.png"), png(edit["mask"], "mask.png")

    def test_realign_writes_the_image_the_mask_and_the_report(self, tmp_path, edit, pipe, monkeypatch):
        monkeypatch.setattr(cli, "load_pipeline", lambda name, device: pipe)
        edited, original, mask = self._save(tmp_path, edit)
        argv = ["realign", "--edited", edited, "--original", original, "--edit-mask", mask, "--paste-back",
                "--output", str(tmp_path / "out.png"), "--output-mask", str(tmp_path / "region.png"),
                "--json", str(tmp_path / "report.json")]  # fmt: skip
        assert cli.main(argv) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        assert corner_error(torch.tensor(report["theta"])[None]) < 0.5 and report["paste_back"] is True
        assert PIL.Image.open(tmp_path / "out.png").size == (SIZE, SIZE)
        assert 0.05 < report["edited_fraction"] < 0.5 and PIL.Image.open(tmp_path / "region.png").mode == "L"

    def test_a_mask_of_the_wrong_size_is_refused_before_any_work(self, tmp_path, edit, monkeypatch, capsys):
        monkeypatch.setattr(cli, "load_pipeline", lambda *args: pytest.fail("loaded a pipeline"))
        edited, original, _ = self._save(tmp_path, edit)
        PIL.Image.new("L", (100, 80)).save(tmp_path / "small.png")
        argv = ["realign", "--edited", edited, "--original", original, "--edit-mask", str(tmp_path / "small.png"),
                "--output", str(tmp_path / "out.png")]  # fmt: skip
        assert cli.main(argv) == 2
        error = capsys.readouterr().err
        assert f"{SIZE}×{SIZE}" in error and "100×80" in error and not (tmp_path / "out.png").exists()
