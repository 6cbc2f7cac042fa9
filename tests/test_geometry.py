import cv2
import numpy as np
import pytest
import torch

from stn_diffusers import geometry


def random_thetas(batch_size: int = 8, warp: str = "standard", seed: int = 0) -> torch.Tensor:
    return geometry.random_theta(batch_size, warp, 512, 512, torch.Generator().manual_seed(seed)).double()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


class TestComposeInvert:
    def test_compose_with_inverse_is_identity(self):
        theta = random_thetas(warp="large")
        identity = geometry.identity_theta(8, dtype=torch.float64)
        torch.testing.assert_close(geometry.compose_theta(theta, geometry.invert_theta(theta)), identity)
        torch.testing.assert_close(geometry.compose_theta(geometry.invert_theta(theta), theta), identity)

    def test_compose_matches_warping_twice(self, photo_tensor):
        first, second = random_thetas(2, "small", seed=1).float().split(1)
        image = photo_tensor
        twice = geometry.warp(geometry.warp(image, first, mode="bicubic"), second, mode="bicubic")
        once = geometry.warp(image, geometry.compose_theta(first, second), mode="bicubic")
        inner = (slice(None), slice(None), slice(64, -64), slice(64, -64))
        assert psnr(twice[inner].clamp(0, 1), once[inner].clamp(0, 1)) > 33

    def test_identity_warp_is_exact(self, photo_tensor):
        out = geometry.warp(photo_tensor, geometry.identity_theta(1))
        assert (out - photo_tensor).abs().mean() < 1e-6


class TestWarp:
    def test_warp_then_inverse_restores_interior_of_photo(self, photo_tensor):
        theta = random_thetas(1, "standard", seed=3).float()
        moved = geometry.warp(photo_tensor, geometry.invert_theta(theta), mode="bicubic")
        restored = geometry.warp(moved, theta, mode="bicubic")
        # The interior: pixels whose round trip stayed inside the image, with a margin for the kernel.
        covered = geometry.warp(geometry.valid_mask(geometry.invert_theta(theta), 512, 512), theta, mode="nearest")
        interior = torch.nn.functional.max_pool2d(1 - covered, 9, 1, 4) == 0
        assert interior.float().mean() > 0.5
        mse = ((restored.clamp(0, 1) - photo_tensor) ** 2)[interior.expand_as(photo_tensor)].mean()
        assert 10 * torch.log10(1 / mse) >= 35

    def test_output_size_and_padding_modes(self, photo_tensor):
        theta = random_thetas(1, "large", seed=4).float()
        for padding_mode in geometry.PADDING_MODES:
            out = geometry.warp(photo_tensor, theta, size=(100, 150), padding_mode=padding_mode)
            assert out.shape == (1, 3, 100, 150)
        zeros = geometry.warp(photo_tensor, theta, padding_mode="zeros")
        border = geometry.warp(photo_tensor, theta, padding_mode="border")
        outside = geometry.warp(torch.ones(1, 1, 512, 512), theta) == 0  # no input pixel contributes
        assert zeros[outside.expand_as(zeros)].abs().max() == 0
        assert border[outside.expand_as(border)].abs().max() > 0

    def test_warp_is_differentiable(self):
        image = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
        theta = (random_thetas(1, "small") + 0.01).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda i, t: geometry.warp(i, t), (image, theta))

    @pytest.mark.parametrize(
        "bad, message",
        [(torch.zeros(3, 8, 8), "(B, C, H, W)"), (torch.zeros(2, 3, 8, 8), "batch size 2")],
    )
    def test_bad_inputs_raise(self, bad, message):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            geometry.warp(bad, geometry.identity_theta(1))

    def test_bad_theta_and_padding_raise(self):
        image = torch.zeros(1, 3, 8, 8)
        with pytest.raises(ValueError, match=r"theta of shape \(B, 2, 3\) or \(B, 3, 3\), got \(1, 6\)"):
            geometry.warp(image, torch.zeros(1, 6))
        with pytest.raises(ValueError, match="padding_mode in"):
            geometry.warp(image, geometry.identity_theta(1), padding_mode="wrap")


class TestPixelMatrix:
    def test_round_trip(self):
        theta = random_thetas()
        for height, width in ((512, 512), (375, 500)):
            pixels = geometry.theta_to_pixel_matrix(theta, height, width)
            torch.testing.assert_close(geometry.pixel_matrix_to_theta(pixels, height, width), theta)

    def test_matches_cv2_warp_affine(self, coffee):
        image = np.asarray(coffee).astype(np.float32) / 255  # 400×600
        height, width = image.shape[:2]
        tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
        theta = random_thetas(1, "standard", seed=5)
        ours = geometry.warp(tensor, theta.float())[0].permute(1, 2, 0).numpy()
        pixels = geometry.theta_to_pixel_matrix(theta, height, width)[0, :2].numpy()
        theirs = cv2.warpAffine(image, pixels, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        forward = np.linalg.inv(geometry.theta_to_pixel_matrix(theta, height, width)[0].numpy())[:2]
        theirs_forward = cv2.warpAffine(image, forward, (width, height), flags=cv2.INTER_LINEAR)
        inner = (slice(40, -40), slice(40, -40))
        covered = geometry.valid_mask(theta.float(), height, width)[0, 0].numpy() > 0
        inside = np.zeros_like(covered)
        inside[inner] = True
        inside &= covered
        assert inside.mean() > 0.4
        assert np.abs(ours - theirs)[inside].mean() < 2e-3
        assert np.abs(ours - theirs_forward)[inside].mean() < 2e-3

    def test_identity_is_identity_in_pixels(self):
        pixels = geometry.theta_to_pixel_matrix(geometry.identity_theta(1, dtype=torch.float64), 300, 400)
        torch.testing.assert_close(pixels[0], torch.eye(3, dtype=torch.float64))


class TestCornerError:
    def test_truth_scores_zero(self):
        theta = random_thetas()
        assert geometry.corner_error(theta, theta, 512, 512).abs().max() < 1e-9

    def test_translation_of_k_pixels_scores_k(self):
        identity = geometry.identity_theta(1, dtype=torch.float64)
        for k, (height, width) in ((3.0, (512, 512)), (12.5, (300, 400))):
            shifted = identity.clone()
            shifted[0, 0, 2] = 2 * k / width
            assert geometry.corner_error(shifted, identity, height, width).item() == pytest.approx(k)
            shifted = identity.clone()
            shifted[0, 1, 2] = 2 * k / height
            assert geometry.corner_error(shifted, identity, height, width).item() == pytest.approx(k)

    def test_rotation_about_centre_moves_corners_by_chord(self):
        angle = np.deg2rad(10.0)
        theta = torch.tensor([[[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0]]])
        radius = np.hypot(256, 256)
        expected = 2 * radius * np.sin(angle / 2)
        identity = geometry.identity_theta(1, dtype=theta.dtype)
        assert geometry.corner_error(theta, identity, 512, 512).item() == pytest.approx(expected)


class TestRandomTheta:
    def test_same_generator_state_same_thetas(self):
        assert torch.equal(random_thetas(seed=7), random_thetas(seed=7))
        assert not torch.equal(random_thetas(seed=7), random_thetas(seed=8))

    def test_ranges_hold(self):
        theta = geometry.random_theta(2000, "standard", 512, 512, torch.Generator().manual_seed(0))
        assert theta[:, :, 2].abs().max() <= 0.2 + 1e-6  # ±10 % of the size = ±0.2 normalised
        determinant = torch.linalg.det(theta[:, :, :2])
        assert 0.9**2 * 0.99 <= determinant.min() and determinant.max() <= 1.1**2 * 1.01
        assert theta[:, :, 2].abs().max() > 0.19  # the range is actually used

    def test_huge_preset_reaches_45_degrees_and_a_quarter_of_the_side(self):
        theta = geometry.random_theta(4000, "huge", 512, 512, torch.Generator().manual_seed(0)).double()
        linear = theta[:, :, :2]
        # Rotation angle of the polar part of the linear map; shear and anisotropy tilt it little.
        angles = torch.rad2deg(torch.atan2(linear[:, 1, 0] - linear[:, 0, 1], linear[:, 0, 0] + linear[:, 1, 1]))
        assert 40 < angles.abs().max() <= 45 + 3
        assert 0.45 < theta[:, :, 2].abs().max() <= 0.5 + 1e-6  # ±25 % of the size = ±0.5 normalised

    def test_none_preset_is_identity(self):
        theta = geometry.random_theta(4, "none", 512, 512, torch.Generator().manual_seed(0))
        torch.testing.assert_close(theta, geometry.identity_theta(4))

    def test_rotation_is_true_rotation_on_non_square_images(self):
        warp_range = geometry.WarpRange(rotation=20.0, scale=(1.0, 1.0), shear=0.0, translation=0.0)
        theta = geometry.random_theta(4, warp_range, 300, 600, torch.Generator().manual_seed(0)).double()
        pixels = geometry.theta_to_pixel_matrix(theta, 300, 600)[:, :2, :2]
        torch.testing.assert_close(pixels @ pixels.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(4, 2, 2))

    def test_unknown_preset_raises(self):
        with pytest.raises(ValueError, match="expected warp in"):
            geometry.random_theta(1, "enormous")


class TestFitAffine:
    def points(self, n=50, seed=0):
        return torch.rand(2, n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1

    def apply(self, theta, points):
        return points @ theta[:, :, :2].transpose(1, 2) + theta[:, :, 2].unsqueeze(1)

    def test_recovers_affine(self):
        theta = random_thetas(2, "large")
        source = self.points()
        torch.testing.assert_close(geometry.fit_affine(source, self.apply(theta, source), regularization=0), theta)

    def test_recovers_similarity_on_non_square_frame(self):
        warp_range = geometry.WarpRange(rotation=20.0, scale=(1.0, 1.0), shear=0.0, translation=0.1)
        theta = geometry.random_theta(2, warp_range, 300, 600, torch.Generator().manual_seed(1)).double()
        source = self.points()
        target = self.apply(theta, source)
        fitted = geometry.fit_affine(source, target, transform="similarity", aspect=2.0, regularization=0)
        torch.testing.assert_close(fitted, theta)

    def test_translation_ignores_linear_part(self):
        theta = random_thetas(2)
        source = self.points()
        fitted = geometry.fit_affine(source, self.apply(theta, source), transform="translation")
        torch.testing.assert_close(fitted[:, :, :2], torch.eye(2, dtype=torch.float64).expand(2, 2, 2))

    def test_weights_ignore_outliers(self):
        theta = random_thetas(2)
        source = self.points()
        target = self.apply(theta, source)
        target[:, :5] += 0.7  # five bad matches
        weights = torch.ones(2, 50, dtype=torch.float64)
        weights[:, :5] = 0
        torch.testing.assert_close(geometry.fit_affine(source, target, weights, regularization=0), theta)

    def test_is_differentiable(self):
        source = self.points(8).requires_grad_(True)
        target = (source.detach() * 1.1 + 0.05).requires_grad_(True)
        weights = torch.rand(2, 8, dtype=torch.float64).add(0.1).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda s, t, w: geometry.fit_affine(s, t, w), (source, target, weights))


def random_homographies(batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    return random_thetas(batch_size, "projective", seed)


class TestHomography:
    def test_projective_preset_gives_homographies_with_the_affine_draw_kept(self):
        homography = random_homographies(6, seed=3)
        affine = random_thetas(6, "standard", seed=3)
        assert homography.shape == (6, 3, 3) and geometry.is_homography(homography)
        assert homography[:, 2, :2].abs().max() > 1e-3  # truly projective
        # Corners move by at most 5 % of the side (0.1 normalised) per axis beyond the affine draw.
        shift = geometry.corner_positions(homography) - geometry.corner_positions(affine)
        assert shift.abs().max() <= 0.1 + 1e-6 and shift.abs().max() > 0.05

    def test_compose_with_inverse_is_identity(self):
        homography = random_homographies()
        eye = torch.eye(3, dtype=torch.float64).expand(8, 3, 3)
        torch.testing.assert_close(geometry.compose_theta(homography, geometry.invert_theta(homography)), eye)
        torch.testing.assert_close(geometry.compose_theta(geometry.invert_theta(homography), homography), eye)

    def test_affine_as_homography_warps_the_same(self, photo_tensor):
        affine = random_thetas(1, "standard", seed=2).float()
        ours = geometry.warp(photo_tensor, geometry.to_homogeneous(affine))
        torch.testing.assert_close(ours, geometry.warp(photo_tensor, affine), atol=1e-4, rtol=0)

    def test_mixed_composition_is_a_homography_matching_two_warps(self, photo_tensor):
        affine = random_thetas(1, "small", seed=1).float()
        homography = random_homographies(1, seed=1).float()
        composed = geometry.compose_theta(affine, homography)
        assert composed.shape == (1, 3, 3)
        once = geometry.warp(photo_tensor, composed)
        twice = geometry.warp(geometry.warp(photo_tensor, affine, padding_mode="border"), homography)
        inner = (slice(None), slice(None), slice(96, -96), slice(96, -96))
        assert psnr(once[inner], twice[inner]) > 30

    def test_warp_matches_cv2_warp_perspective(self, coffee):
        image = np.asarray(coffee).astype(np.float32) / 255  # 400×600
        height, width = image.shape[:2]
        tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
        theta = random_homographies(1, seed=5)
        ours = geometry.warp(tensor, theta.float())[0].permute(1, 2, 0).numpy()
        pixels = geometry.theta_to_pixel_matrix(theta, height, width)[0].numpy()
        theirs = cv2.warpPerspective(image, pixels, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        covered = geometry.valid_mask(theta.float(), height, width)[0, 0].numpy() > 0
        inside = np.zeros_like(covered)
        inside[40:-40, 40:-40] = True
        inside &= covered
        assert inside.mean() > 0.4
        assert np.abs(ours - theirs)[inside].mean() < 2e-3

    def test_pixel_matrix_round_trip_and_cv2_find_homography(self):
        theta = random_homographies(4, seed=6)
        height, width = 375, 500
        pixels = geometry.theta_to_pixel_matrix(theta, height, width)
        back = geometry.pixel_matrix_to_theta(pixels, height, width, transform="homography")
        torch.testing.assert_close(back, theta)
        # cv2.findHomography from reference pixels to where they show in the moving image is P.
        reference = np.float32([[30, 40], [470, 20], [480, 350], [25, 330], [250, 190], [100, 300]])
        homogeneous = np.concatenate([reference, np.ones((6, 1), np.float32)], 1) @ pixels[0].numpy().T
        moving = (homogeneous[:, :2] / homogeneous[:, 2:]).astype(np.float32)
        found, _ = cv2.findHomography(reference, moving)
        converted = geometry.pixel_matrix_to_theta(torch.from_numpy(found)[None], height, width, transform="homography")
        torch.testing.assert_close(converted, theta[:1], atol=1e-6, rtol=1e-5)

    def test_affine_conversion_refuses_a_projective_matrix(self):
        pixels = geometry.theta_to_pixel_matrix(random_homographies(1), 64, 64)
        with pytest.raises(ValueError, match="transform='homography'"):
            geometry.pixel_matrix_to_theta(pixels, 64, 64)
        with pytest.raises(ValueError, match="expected transform in"):
            geometry.pixel_matrix_to_theta(pixels, 64, 64, transform="perspective")

    def test_corner_error_of_a_pure_corner_move(self):
        # Move one corner of the identity by 0.1 normalised in x: 0.1 · 256 = 25.6 px on one corner of four.
        corners = geometry.corner_positions(geometry.identity_theta(1, dtype=torch.float64))
        moved = corners.clone()
        moved[0, 2, 0] += 0.1
        homography = geometry.fit_homography(corners, moved, regularization=0.0)
        error = geometry.corner_error(homography, geometry.identity_theta(1, dtype=torch.float64), 512, 512)
        assert error.item() == pytest.approx(25.6 / 4)

    def test_fit_homography_recovers_a_homography_and_ignores_outliers(self):
        theta = random_homographies(2, seed=9)
        source = torch.rand(2, 50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
        target = geometry.apply_theta(theta, source)
        torch.testing.assert_close(geometry.fit_homography(source, target, regularization=0.0), theta)
        target[:, :5] += 0.5  # five gross outliers, weighted out
        weights = torch.ones(2, 50, dtype=torch.float64)
        weights[:, :5] = 0
        torch.testing.assert_close(geometry.fit_homography(source, target, weights, regularization=0.0), theta)

    def test_fit_homography_needs_four_points(self):
        with pytest.raises(ValueError, match="at least 4 points"):
            geometry.fit_homography(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))

    def test_warp_and_fit_are_differentiable(self):
        image = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
        theta = random_homographies(1, seed=4).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda i, t: geometry.warp(i, t), (image, theta))
        source = torch.rand(1, 6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
        target = geometry.apply_theta(theta.detach(), source).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: geometry.fit_homography(source, t), (target,))


class TestPixelLinearPart:
    @pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (300, 200)])
    def test_is_the_linear_part_of_the_pixel_matrix(self, height, width):
        theta = torch.tensor([[[1.3, 0.2, 0.1], [-0.4, 0.7, -0.2]], [[0.9, -0.05, 0.0], [0.1, 1.1, 0.3]]]).double()
        expected = geometry.theta_to_pixel_matrix(theta, height, width)[:, :2, :2]
        torch.testing.assert_close(geometry.pixel_linear_part(theta, height, width), expected)

    def test_singular_values_in_closed_form_match_an_svd(self):
        matrices = torch.tensor(
            [[[1.3, 0.2], [-0.4, 0.7]], [[2.0, 0.0], [0.0, 0.5]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]]],
            dtype=torch.float64,
        )  # general, diagonal, singular, a rotation
        torch.testing.assert_close(geometry.singular_values_2x2(matrices), torch.linalg.svdvals(matrices))
