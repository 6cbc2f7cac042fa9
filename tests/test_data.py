import logging
import re

import numpy as np
import pytest
import torch

from stn_diffusers import data, geometry


@pytest.fixture
def sources(photo_tensor, coffee):
    return [photo_tensor[0], torch.from_numpy(np.array(coffee)).permute(2, 0, 1).float() / 255]


class TestPairs:
    def test_pairs_are_reproducible_by_seed(self, sources):
        first = data.seeded_pairs(sources, 3, resolution=128, seed=4)
        again = data.seeded_pairs(sources, 3, resolution=128, seed=4)
        other = data.seeded_pairs(sources, 3, resolution=128, seed=5)
        for a, b in zip(first, again):
            assert torch.equal(a.moving, b.moving) and torch.equal(a.theta, b.theta)
        assert not torch.equal(first[0].theta, other[0].theta)
        # Pair i does not depend on how many pairs are drawn.
        assert torch.equal(data.seeded_pairs(sources, 1, resolution=128, seed=4)[0].moving, first[0].moving)

    def test_true_theta_aligns_moving_onto_reference(self, sources):
        for pair in data.seeded_pairs(sources, 4, resolution=256, warp="standard", seed=1):
            aligned = geometry.warp(pair.moving[None], pair.theta[None], mode="bicubic")[0].clamp(0, 1)
            inner = (slice(None), slice(48, -48), slice(48, -48))
            covered = geometry.valid_mask(pair.theta[None], 256, 256)[0].bool()
            error_after = (aligned - pair.reference)[inner].abs()[covered[inner].expand(3, -1, -1)].mean()
            error_before = (pair.moving - pair.reference)[inner].abs().mean()
            assert error_after < 0.03 < error_before

    def test_moving_view_has_real_content_at_its_borders(self, sources):
        pair = data.seeded_pairs(sources[1:], 1, resolution=256, warp="standard", seed=2)[0]
        # Warping the crop itself would pad this share of the moving view with black:
        padded_if_cropped_first = 1 - geometry.valid_mask(geometry.invert_theta(pair.theta[None]), 256, 256).mean()
        assert padded_if_cropped_first > 0.05
        assert (pair.moving.sum(0) == 0).float().mean() < padded_if_cropped_first / 5

    def test_realistic_photometry_changes_pixels_not_geometry(self, sources):
        plain = data.seeded_pairs(sources, 2, resolution=128, seed=3)
        shot = data.seeded_pairs(sources, 2, resolution=128, seed=3, photometric="realistic")
        for a, b in zip(plain, shot):
            assert torch.equal(a.theta, b.theta) and torch.equal(a.reference, b.reference)
            difference = (a.moving - b.moving).abs().mean()
            assert 0.005 < difference < 0.2

    def test_local_change_replaces_the_requested_share_and_nothing_else(self, sources):
        plain = data.seeded_pairs(sources, 4, resolution=128, warp="none", seed=6)
        edited = data.seeded_pairs(sources, 4, resolution=128, warp="none", seed=6, local_change=0.2)
        for a, b in zip(plain, edited):
            assert a.changed is None and b.changed.shape == (1, 128, 128)
            assert torch.equal(a.theta, b.theta) and torch.equal(a.reference, b.reference)
            assert torch.equal(a.theta, geometry.identity_theta(1)[0])  # zero motion
            assert b.changed.mean().item() == pytest.approx(0.2, abs=0.02)
            outside = b.changed.expand(3, -1, -1) == 0
            assert torch.equal(a.moving[outside], b.moving[outside])
            inside = ~outside
            assert (a.moving[inside] - b.moving[inside]).abs().mean() > 0.05  # other content

    def test_local_change_in_the_reference_frame_follows_theta(self, sources):
        pair = data.seeded_pairs(sources, 1, resolution=128, warp="standard", seed=2, local_change=0.25)[0]
        in_reference = geometry.warp(pair.changed[None], pair.theta[None], mode="nearest")[0]
        aligned = geometry.warp(pair.moving[None], pair.theta[None], mode="nearest")[0]
        # Where the changed region lands after alignment, the aligned image differs from the reference.
        region = in_reference.bool().expand(3, -1, -1)
        assert region.any()
        assert (aligned - pair.reference)[region].abs().mean() > 0.05

    def test_bad_arguments(self, sources):
        with pytest.raises(ValueError, match=re.escape("expected local_change in [0, 1), got 1.5")):
            data.seeded_pairs(sources, 1, local_change=1.5)
        with pytest.raises(ValueError, match="photometric in"):
            data.seeded_pairs(sources, 1, photometric="film")
        with pytest.raises(ValueError, match=re.escape(f"photometric in {data.PHOTOMETRIC_MODES}, got 'film'")):
            data.PoolSettings(photometric="film")
        for mode in data.PHOTOMETRIC_MODES:  # every named mode is accepted by both
            data.PoolSettings(photometric=mode)
            assert len(data.seeded_pairs(sources, 1, resolution=64, photometric=mode)) == 1
        with pytest.raises(ValueError, match="at least one source"):
            data.seeded_pairs([], 1)


class TestFolders:
    def test_missing_and_empty_folders(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            data.list_images(tmp_path / "nowhere")
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(ValueError, match="expected image files"):
            data.list_images(tmp_path)

    def test_unreadable_files_are_skipped_with_one_warning(self, tmp_path, astronaut, caplog):
        nested = tmp_path / "a" / "b"
        nested.mkdir(parents=True)
        astronaut.save(nested / "good.jpg")
        astronaut.convert("L").save(tmp_path / "grey.png")
        astronaut.convert("RGBA").save(tmp_path / "alpha.png")
        (tmp_path / "fake.png").write_text("this is text")
        jpeg = (nested / "good.jpg").read_bytes()
        (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
        paths = data.list_images(tmp_path)
        assert len(paths) == 5
        with caplog.at_level(logging.WARNING):
            images, loaded = data.load_images(paths)
        assert len(images) == 3 and all(image.mode == "RGB" for image in images)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "2 unreadable" in warnings[0].getMessage()
        assert "fake.png" in warnings[0].getMessage() and "truncated.jpg" in warnings[0].getMessage()
        with pytest.raises(ValueError, match="fake.png|truncated.jpg"):
            data.load_images(paths, strict=True)

    def test_small_images_are_upscaled_to_the_resolution(self):
        small = torch.rand(3, 100, 150)
        assert tuple(data.fit_shorter_side(small, 256, 512).shape) == (3, 256, 384)
        big = torch.rand(3, 1200, 900)
        assert tuple(data.fit_shorter_side(big, 256, 512).shape) == (3, 683, 512)


class TestProjectivePools:
    def test_views_are_homographies_and_pairs_compose_them(self, sources):
        settings = data.PoolSettings(resolution=128, warp=geometry.WARP_PRESETS["projective"], pairs_per_image=3)
        thetas = data.view_thetas(settings, 0)
        assert thetas.shape == (4, 3, 3)
        torch.testing.assert_close(thetas[0], torch.eye(3))
        assert thetas[1:, 2, :2].abs().max() > 0  # the warped views are truly projective
        # The rendered view k, aligned by its θ, shows the reference crop (view 0).
        views = data.render_views(sources[0], settings, 0)
        aligned = geometry.warp(views[3:4], thetas[3:4], mode="bicubic")[0].clamp(0, 1)
        covered = geometry.valid_mask(thetas[3:4], 128, 128)[0].bool().expand(3, -1, -1)
        assert (aligned - views[0])[covered].abs().mean() < (views[3] - views[0]).abs().mean() / 3
        latents = [torch.randn(settings.num_views, 4, 16, 16)]
        pool = data.LatentPairPool(settings, [thetas], latents=latents)
        batch = pool.sample(6, torch.Generator().manual_seed(0))
        assert batch["theta"].shape == (6, 3, 3)
