import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from stn_diffusers import STN_PRESETS, SpatialTransformer, STNAlignmentPipeline, analysis, cli, files, geometry, metrics

from .conftest import TINY_REGISTRATION, make_tiny_vae

SEED_ACTIVATIONS = [[32, 58, 58], [32, 29, 29], [64, 25, 25], [64, 12, 12]]


@pytest.fixture(scope="module")
def seed_report(tmp_path_factory, astronaut, coffee):
    """`stn-diffusers analyze` on a saved untrained seed pipeline, with fine-tuning metrics beside it."""
    root = tmp_path_factory.mktemp("analyze")
    pipeline_dir, photos, output = root / "pipeline", root / "photos", root / "report"
    STNAlignmentPipeline(vae=make_tiny_vae(), stn=SpatialTransformer()).save_pretrained(pipeline_dir)
    records = [{"step": step, "loss": 10.0 / step, "val_corner_error": 20.0 / step} for step in (1, 2, 4)]
    (pipeline_dir / analysis.METRICS_FILE).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    photos.mkdir()
    astronaut.save(photos / "astronaut.png")
    coffee.save(photos / "coffee.jpg")
    code = cli.main(
        ["analyze", "--pipeline", str(pipeline_dir), "--data", str(photos), "--num-pairs", "4",
         "--num-visual", "1", "--output", str(output)]
    )  # fmt: skip
    assert code == 0
    return output, json.loads((output / "report.json").read_text())


class TestAnalyzeSeed:
    def test_architecture_matches_seed_design(self, seed_report):
        _, report = seed_report
        architecture = report["architecture"]
        assert architecture["total_parameters"] == 352_710
        assert architecture["input_shape"] == [4, 64, 64]
        assert architecture["activation_shapes"] == SEED_ACTIVATIONS
        assert sum(layer["parameters"] for layer in architecture["layers"]) == 352_710

    def test_untrained_seed_is_identity(self, seed_report):
        _, report = seed_report
        identity = report["identity"]
        assert identity["num_samples"] == 4
        assert identity["identity_rate"] == 1.0
        assert identity["max_theta_deviation"] <= analysis.IDENTITY_TOLERANCE
        assert identity["latent_difference"] < 1e-5

    def test_only_last_layer_receives_gradient(self, seed_report):
        _, report = seed_report
        flow = report["gradient_flow"]
        assert flow["modules_with_gradient"] == ["fc_loc.2"]
        assert flow["modules_without_gradient"] == ["localization.0", "localization.3", "fc_loc.0"]
        assert flow["loss"] > 0
        last = [row["grad_norm"] for row in flow["parameters"] if row["module"] == "fc_loc.2"]
        assert flow["mean_grad_norm"] == pytest.approx(sum(last) / len(flow["parameters"]))

    def test_theta_statistics_equal_the_identity_baseline(self, seed_report):
        _, report = seed_report
        theta = report["theta"]
        # An identity model's corner error is the misalignment itself.
        assert theta["corner_errors"] == pytest.approx(theta["identity_corner_errors"], abs=1e-6)
        assert theta["corner_error"]["median"] > 0
        assert theta["mae"] > 0

    def test_writes_markdown_figures_and_training_curves(self, seed_report):
        output, report = seed_report
        assert set(report["figures"]) == set(analysis.FIGURES)
        written = {analysis.REPORT_JSON, analysis.REPORT_MARKDOWN, *analysis.FIGURES.values()}
        assert {p.name for p in output.iterdir()} == written  # and no temporary file
        for name in report["figures"].values():
            with PIL.Image.open(output / name) as figure:
                assert figure.format == "PNG" and min(figure.size) > 100
        assert report["training"]["records"] == 3
        assert report["training"]["last"] == {"loss": 2.5, "val_corner_error": 5.0}
        markdown = (output / "report.md").read_text()
        assert "352,710 parameters" in markdown and "32×58×58 → 32×29×29 → 64×25×25 → 64×12×12" in markdown
        assert "`fc_loc.2.bias`" in markdown and "grid.png" in markdown
        # The corner-error table shows the statistics of every report (metrics.summarize_errors).
        corner = report["theta"]["corner_error"]
        assert "| " + " | ".join(["stn", *metrics.summary_cells(corner)]) + " |" in markdown


def _latents(batch: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


class TestGradientFlow:
    def test_gradient_reaches_first_layer_once_last_layer_has_learned(self):
        torch.manual_seed(0)
        stn = SpatialTransformer()
        latents = _latents(4)
        true_theta = geometry.random_theta(4, "standard", 512, 512, torch.Generator().manual_seed(1))
        optimizer = torch.optim.SGD(stn.parameters(), lr=1e-3)
        for _ in range(2):
            optimizer.zero_grad()
            analysis.corner_error_loss(stn, latents, latents, true_theta, 512, 512).backward()
            optimizer.step()
        flow = analysis.gradient_flow(stn, latents, latents, true_theta, 512, 512)
        assert "localization.0" in flow["modules_with_gradient"]
        assert flow["modules_without_gradient"] == []

    def test_leaves_grad_and_requires_grad_as_they_were(self):
        stn = SpatialTransformer()
        stn.localization[0].weight.requires_grad_(False)
        marker = torch.ones_like(stn.fc_loc[2].bias)
        stn.fc_loc[2].bias.grad = marker
        true_theta = geometry.random_theta(2, "small", 512, 512, torch.Generator().manual_seed(0))
        analysis.gradient_flow(stn, _latents(2), _latents(2), true_theta, 512, 512)
        assert stn.fc_loc[2].bias.grad is marker
        assert stn.fc_loc[0].weight.grad is None
        assert not stn.localization[0].weight.requires_grad

    def test_registration_design_at_init_trains_only_its_gates(self):
        torch.manual_seed(0)
        stn = SpatialTransformer(**TINY_REGISTRATION)
        latents = _latents(2, 32)
        true_theta = geometry.random_theta(2, "standard", 256, 256, torch.Generator().manual_seed(0))
        moving = geometry.warp(latents, geometry.invert_theta(true_theta))
        flow = analysis.gradient_flow(stn, moving, latents, true_theta, 256, 256)
        # Zero gates hide the matcher from the loss at initialisation, like the seed's zero last layer.
        assert flow["modules_with_gradient"] == ["residual_gate"]


class TestIdentityCheck:
    def test_detects_a_model_that_moves_latents(self):
        stn = SpatialTransformer()
        with torch.no_grad():
            stn.fc_loc[2].bias[2] += 0.05  # a constant shift of x
        check = analysis.identity_check(STNAlignmentPipeline(vae=make_tiny_vae(), stn=stn), _latents(3))
        assert check["identity_rate"] == 0.0
        assert check["max_theta_deviation"] == pytest.approx(0.05, abs=1e-6)
        assert check["latent_difference"] > 1e-3

    def test_takes_the_pipeline_whose_theta_path_batches_the_latents(self):
        with pytest.raises(TypeError, match="STNAlignmentPipeline"):
            analysis.identity_check(SpatialTransformer(), _latents(1))


class TestThetaStatistics:
    def test_truth_scores_zero_and_identity_scores_the_baseline(self):
        true_theta = geometry.random_theta(5, "standard", 256, 384, torch.Generator().manual_seed(0))
        perfect = analysis.theta_statistics(true_theta, true_theta, 256, 384)
        assert perfect["mae"] == pytest.approx(0.0, abs=1e-7)
        assert perfect["corner_error"]["p90"] == pytest.approx(0.0, abs=1e-4)
        assert perfect["corner_error"]["under_1px"] == 1.0
        doing_nothing = analysis.theta_statistics(geometry.identity_theta(5), true_theta, 256, 384)
        assert doing_nothing["corner_error"] == pytest.approx(doing_nothing["identity_corner_error"])
        expected = (true_theta - geometry.identity_theta(5)).abs().mean(dim=0)
        assert torch.tensor(doing_nothing["mae_per_entry"]) == pytest.approx(expected, abs=1e-6)
        assert doing_nothing["corner_error"]["median"] <= doing_nothing["corner_error"]["p90"]


class TestLayerTable:
    def test_correlation_design_reports_its_pyramid_at_the_configured_size(self):
        stn = SpatialTransformer(**{**TINY_REGISTRATION, "sample_size": 32})
        table = analysis.layer_table(stn)
        assert table["input_shape"] == [4, 32, 32]
        # stem at full size, then strides 2, 4 and 8 of the latent grid
        assert [shape[1:] for shape in table["activation_shapes"]] == [[32, 32], [16, 16], [8, 8], [4, 4]]
        counted = sum(layer["parameters"] for layer in table["layers"])
        counted += sum(p["parameters"] for p in table["other_parameters"])
        assert counted == table["total_parameters"] == sum(p.numel() for p in stn.parameters())
        assert {p["name"] for p in table["other_parameters"]} == {"log_match_scale", "residual_gate"}

    def test_full_correlation_design_shapes_follow_sample_size(self):
        table = analysis.layer_table(SpatialTransformer(**STN_PRESETS["correlation"]), sample_size=48)
        # stem, then each stride's block output and its 64-d matching features (merged where equal)
        expected = [[32, 48, 48], [48, 24, 24], [64, 24, 24], [64, 12, 12], [96, 6, 6], [64, 6, 6]]
        assert table["activation_shapes"] == expected


class TestWriting:
    def test_a_failed_figure_leaves_the_previous_report_and_no_temporary_file(self, tmp_path, monkeypatch):
        stn = SpatialTransformer(**{**TINY_REGISTRATION, "sample_size": 32})  # 256-pixel pairs: fast
        pipe = STNAlignmentPipeline(vae=make_tiny_vae(), stn=stn)
        output = tmp_path / "report"
        output.mkdir()
        (output / analysis.REPORT_MARKDOWN).write_text("the previous report")
        figure_writer = files.figure_writer

        def failing_for_corner_error(figure, path, **options):
            if Path(path).name != analysis.FIGURES["corner_error"]:
                return figure_writer(figure, path, **options)

            def fail(partial):  # the figures before it are already written to their temporary files
                partial.write_bytes(b"half a png")
                raise OSError("disk full")

            return fail

        monkeypatch.setattr(files, "figure_writer", failing_for_corner_error)
        with pytest.raises(OSError, match="disk full"):
            analysis.analyze(pipe, output, num_pairs=1, num_visual=0)
        assert [p.name for p in output.iterdir()] == [analysis.REPORT_MARKDOWN]
        assert (output / analysis.REPORT_MARKDOWN).read_text() == "the previous report"


class TestInputs:
    def test_rejects_bad_arguments(self, seed_pipeline, tmp_path):
        with pytest.raises(ValueError, match="num_pairs"):
            analysis.analyze(seed_pipeline, tmp_path, num_pairs=0)
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
        with pytest.raises(ValueError, match="line 2"):
            analysis.read_metrics(tmp_path / "metrics.jsonl")
        with pytest.raises(ValueError, match="step"):
            analysis.plot_training_curves([{"epoch": 1}], tmp_path / "curves.png")
        # The report compares the six entries of an affine θ: homographies are refused before any work.
        with pytest.raises(ValueError, match="expected an affine warp and stn"):
            analysis.analyze(seed_pipeline, tmp_path / "projective", num_pairs=1, warp="projective")
        assert not (tmp_path / "projective").exists()
        with pytest.raises(ValueError, match=r"one shape \(B, 2, 3\)"):
            analysis.theta_statistics(geometry.identity_theta(2), geometry.random_theta(2, "projective"), 64, 64)

    def test_cli_reports_a_missing_data_folder(self, tmp_path, seed_pipeline, capsys):
        seed_pipeline.save_pretrained(tmp_path / "pipeline")
        code = cli.main(
            ["analyze", "--pipeline", str(tmp_path / "pipeline"), "--data", str(tmp_path / "nowhere"),
             "--output", str(tmp_path / "r")]
        )  # fmt: skip
        assert code == 2
        assert "nowhere" in capsys.readouterr().err
