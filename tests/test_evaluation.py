"""The alignment benchmark: the metric on known cases, method conventions, reproducible pairs, the CLI."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stn_diffusers import cli, evaluation, geometry, metrics
from stn_diffusers.cli import build_parser, main
from stn_diffusers.data import Pair, seeded_pairs
from stn_diffusers.evaluation import (
    DEFAULT_METHODS,
    DEFAULT_NUM_PAIRS,
    estimate_ecc,
    estimate_features,
    estimate_phase,
    evaluate,
    latent_floor_theta,
    markdown_table,
    method_unavailable,
    pair_error,
    parse_methods,
)

SIZE = 256


def _translation_theta(dx: float, dy: float, size: int = SIZE) -> torch.Tensor:
    matrix = torch.tensor([[[1.0, 0.0, dx], [0.0, 1.0, dy]]], dtype=torch.float64)
    return geometry.pixel_matrix_to_theta(matrix, size, size).float()


def _translated_pair(photo_tensor, dx: float, dy: float) -> Pair:
    """A 256 crop of the astronaut and the same scene moved so reference pixel x shows at x + (dx, dy)."""
    photo = photo_tensor[0]
    reference = photo[:, 128:384, 128:384]
    moving = photo[:, 128 - dy : 384 - dy, 128 - dx : 384 - dx]  # M(x) = R(x - d), so R(x) shows at M(x + d)
    return Pair(reference=reference, moving=moving, theta=_translation_theta(dx, dy)[0], name="astronaut")


class TestMetric:
    def test_truth_scores_zero(self, photo_tensor):
        pair = seeded_pairs([photo_tensor[0]], 1, SIZE, "standard", seed=3)[0]
        assert pair_error(pair.theta[None], pair) == pytest.approx(0.0, abs=1e-9)

    def test_identity_scores_the_warps_own_corner_motion(self, photo_tensor):
        pair = seeded_pairs([photo_tensor[0]], 1, SIZE, "standard", seed=3)[0]
        # Independently: move the four corners (pixel edges) with the pixel matrix.
        matrix = geometry.theta_to_pixel_matrix(pair.theta[None].double(), SIZE, SIZE)[0].numpy()
        corners = np.array([[-0.5, -0.5, 1], [SIZE - 0.5, -0.5, 1], [SIZE - 0.5, SIZE - 0.5, 1], [-0.5, SIZE - 0.5, 1]])
        expected = np.linalg.norm((corners @ matrix.T)[:, :2] - corners[:, :2], axis=1).mean()
        assert pair_error(geometry.identity_theta(1), pair) == pytest.approx(expected, rel=1e-6)
        assert expected > 5

    @pytest.mark.parametrize("k", [1.0, 3.5, 12.0])
    def test_translation_of_k_pixels_scores_k(self, photo_tensor, k):
        pair = seeded_pairs([photo_tensor[0]], 1, SIZE, "standard", seed=1)[0]
        shifted = pair.theta[None].clone()
        shifted[:, 0, 2] += 2 * k / SIZE  # k pixels along x in normalised units
        assert pair_error(shifted, pair) == pytest.approx(k, rel=1e-5)


class TestConventions:
    """Each classical estimator returns θ aligning moving onto reference, on a known translation."""

    @pytest.mark.parametrize(
        "estimator", [estimate_ecc, estimate_phase, estimate_features], ids=["ecc", "phase", "sift"]
    )
    def test_known_translation(self, photo_tensor, estimator):
        pair = _translated_pair(photo_tensor, dx=7, dy=-4)
        theta = estimator(pair.reference, pair.moving)
        assert pair_error(theta, pair) < 0.5
        # The inverse direction would be off by twice the shift.
        assert pair_error(geometry.invert_theta(theta), pair) > 10


class TestPairsAndMethods:
    def test_pairs_are_reproducible_by_seed(self, photo_tensor, coffee):
        sources = [photo_tensor[0], torch.from_numpy(np.array(coffee)).permute(2, 0, 1).float() / 255]
        first = evaluate({}, sources, num_pairs=3, resolution=128, seed=5, methods="identity,phase")
        again = evaluate({}, sources, num_pairs=3, resolution=128, seed=5, methods="identity,phase")
        other = evaluate({}, sources, num_pairs=3, resolution=128, seed=6, methods="identity,phase")
        for method in ("identity", "phase"):
            assert first["methods"][method]["mean"] == again["methods"][method]["mean"]
        assert first["methods"]["identity"]["mean"] != other["methods"]["identity"]["mean"]

    def test_every_method_runs_and_reports_the_json_fields(self, registration_pipeline, photo_tensor):
        report = evaluate(
            {"tiny": registration_pipeline}, [photo_tensor[0]], num_pairs=2, resolution=SIZE, warp="small",
            methods=DEFAULT_METHODS, kornia_budget=120,
        )  # fmt: skip
        expected = {"identity", "tiny", "tiny+ecc", "tiny latent floor", "ecc", "sift", "orb", "phase", "kornia"}
        for method in DEFAULT_METHODS:
            reason = method_unavailable(method)
            if reason:  # only an absent optional dependency may skip a method, with the reason shown
                expected.discard(method)
                assert method in report["skipped"] and "install" in report["skipped"][method]
        assert set(report["methods"]) == expected
        assert report["pairs"] == 2 and report["resolution"] == SIZE and report["warp"] == "small"
        # The one vocabulary of corner-error statistics (metrics.summarize_errors), plus timings.
        fields = {"mean", "median", "p90", "under_1px", "under_2px", "under_5px", "seconds_per_pair", "failures"}
        for name, summary in report["methods"].items():
            assert fields <= set(summary), name
            assert summary["seconds_per_pair"] >= 0 and 0 <= summary["under_1px"] <= summary["under_5px"] <= 1
        tiny = report["methods"]["tiny"]
        assert tiny["seconds_per_pair_with_encode"] > tiny["seconds_per_pair"]
        # small warps on a textured photo: ECC from the (untrained) STN's θ lands under a pixel
        assert report["methods"]["tiny+ecc"]["under_1px"] == 1.0
        assert report["methods"]["identity"]["mean"] > 2
        table = markdown_table(report)
        assert "| tiny+ecc |" in table and "| identity |" in table
        # Both time columns say what they include.
        assert f"| {metrics.TIME_PER_PAIR} | {metrics.TIME_PER_PAIR_WITH_ENCODE} |" in table

    def test_zero_motion_pairs_with_local_changes_score_the_reported_motion(self, photo_tensor, coffee):
        sources = [photo_tensor[0], torch.from_numpy(np.array(coffee)).permute(2, 0, 1).float() / 255]
        report = evaluate(
            {}, sources, num_pairs=4, resolution=128, warp="none", local_change=0.2, methods="identity,phase"
        )
        assert report["local_change"] == 0.2 and report["warp"] == "none"
        # The truth is the identity: doing nothing is exact, any reported motion is the error.
        assert report["methods"]["identity"]["mean"] == 0 and report["methods"]["identity"]["under_1px"] == 1
        assert "20% of each moving image replaced" in markdown_table(report)

    def test_latent_floor_stays_at_the_truth_when_latents_warp_exactly(self):
        generator = torch.Generator().manual_seed(0)
        # Smooth random "latents": a warped copy is exactly what the floor's model assumes.
        reference = F.interpolate(torch.randn(1, 4, 8, 8, generator=generator), size=(64, 64), mode="bicubic")
        theta = geometry.random_theta(1, "standard", 512, 512, generator)
        moving = geometry.warp(reference, geometry.invert_theta(theta), padding_mode="border")
        best = latent_floor_theta(moving, reference, theta)
        assert geometry.corner_error(best, theta, 512, 512).item() < 0.5
        # Started off the truth, it pulls back towards it: the objective's minimum is near the truth.
        nudged = theta.clone()
        nudged[:, :, 2] += 0.02  # 5 px at 512
        back = latent_floor_theta(moving, reference, nudged)
        assert geometry.corner_error(back, theta, 512, 512) < geometry.corner_error(nudged, theta, 512, 512) / 4

    def test_latent_floor_is_reported_beside_the_stn(self, registration_pipeline, photo_tensor):
        report = evaluate(
            {"tiny": registration_pipeline}, [photo_tensor[0]], num_pairs=2, resolution=SIZE, warp="small",
            methods="identity,latent-floor",
        )  # fmt: skip
        assert set(report["methods"]) == {"identity", "tiny latent floor"}
        floor = report["methods"]["tiny latent floor"]
        assert floor["mean"] < report["methods"]["identity"]["mean"]
        assert "oracle" in floor["note"]

    def test_projective_pairs_need_the_homography_methods(self, photo_tensor):
        report = evaluate(
            {}, [photo_tensor[0]], num_pairs=3, resolution=SIZE, warp="projective",
            methods="identity,sift,sift-homography,ecc-homography",
        )  # fmt: skip
        found = report["methods"]
        # An affine fit cannot follow the moved corners; the homography fits can.
        assert found["sift-homography"]["mean"] < 1.0 < found["sift"]["mean"]
        assert found["ecc-homography"]["under_1px"] == 1.0

    def test_zero_pairs_is_a_value_error_before_any_work(self, photo_tensor, monkeypatch):
        def no_pairs(*args, **kwargs):
            raise AssertionError("pairs were drawn before num_pairs was checked")

        monkeypatch.setattr(evaluation, "seeded_pairs", no_pairs)
        with pytest.raises(ValueError, match="num_pairs >= 1, got 0"):
            evaluate({}, [photo_tensor[0]], num_pairs=0, methods="identity")

    def test_unknown_method_is_a_value_error(self):
        with pytest.raises(ValueError, match="sift"):
            parse_methods("identity,surf")


class TestCli:
    def test_embedded_pipelines_are_named_like_in_every_other_verb(self, monkeypatch, tmp_path):
        loaded = []
        monkeypatch.setattr(cli, "load_pipeline", lambda name, device: loaded.append(name) or name)
        pipelines = cli._named_pipelines(["accurate", "fast=fast"], torch.device("cpu"))
        assert pipelines == {"accurate": "accurate", "fast": "fast"} and loaded == ["accurate", "fast"]
        (tmp_path / "accurate").mkdir()  # a folder of that name is a folder, and this one holds no pipeline
        monkeypatch.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match="model_index.json"):
            cli._named_pipelines(["accurate"], torch.device("cpu"))

    def test_defaults_are_the_librarys(self):
        args = build_parser().parse_args(["evaluate", "--data", "photos"])
        assert args.num_pairs == inspect.signature(evaluate).parameters["num_pairs"].default == DEFAULT_NUM_PAIRS
        assert parse_methods(args.methods) == list(DEFAULT_METHODS)

    def test_evaluate_writes_json_and_markdown(self, registration_pipeline, astronaut, tmp_path, capsys):
        pipeline_dir, data_dir = tmp_path / "pipe", tmp_path / "photos"
        registration_pipeline.save_pretrained(pipeline_dir)
        data_dir.mkdir()
        astronaut.save(data_dir / "astronaut.png")
        out_json, out_md = tmp_path / "report.json", tmp_path / "report.md"
        code = main([
            "evaluate", "--pipeline", f"tiny={pipeline_dir}", "--data", str(data_dir), "--num-pairs", "2",
            "--resolution", "128", "--warp", "small", "--methods", "identity,stn,stn+ecc,phase",
            "--json", str(out_json), "--markdown", str(out_md),
        ])  # fmt: skip
        assert code == 0
        report = json.loads(out_json.read_text())
        assert set(report["methods"]) == {"identity", "tiny", "tiny+ecc", "phase"}
        assert report["photometric"] == "none" and report["pairs"] == 2
        assert "| tiny+ecc |" in out_md.read_text()
        assert "| phase |" in capsys.readouterr().out
