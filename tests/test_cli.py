import json
import logging

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


def test_align_reports_confidence_and_fails_below_a_threshold(tmp_path, saved_pipeline, coffee, astronaut, capsys):
    image, reference = tmp_path / "moving.png", tmp_path / "reference.png"
    coffee.resize((512, 512)).save(image)
    astronaut.save(reference)  # another photo: the (untrained) aligner cannot be right
    base = ["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(reference)]
    theta_json = tmp_path / "theta.json"
    assert cli.main([*base, "--output", str(tmp_path / "a.png"), "--json", str(theta_json)]) == 0
    confidence = json.loads(theta_json.read_text())["confidence"]
    assert 0.0 <= confidence < 0.5 and "confidence:" in capsys.readouterr().out
    # Below --fail-below: exit status 3, one line on stderr, the outputs still written.
    code = cli.main([*base, "--output", str(tmp_path / "b.png"), "--fail-below", "0.5"])
    assert code == cli.LOW_CONFIDENCE_EXIT_CODE and (tmp_path / "b.png").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: confidence")
    assert cli.main([*base, "--output", str(tmp_path / "c.png"), "--fail-below", "0"]) == 0
    with pytest.raises(SystemExit):
        cli.main([*base, "--output", str(tmp_path / "d.png"), "--fail-below", "1.5"])


def test_align_decoded_writes_working_size(tmp_path, saved_pipeline, astronaut):
    image = tmp_path / "a.png"
    astronaut.save(image)
    output = tmp_path / "decoded.png"
    assert cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image),
                     "--output", str(output), "--decoded"]) == 0  # fmt: skip
    assert PIL.Image.open(output).size == (512, 512)


def test_align_writes_the_pixel_warp_without_running_the_decoder(tmp_path, saved_pipeline, coffee, monkeypatch):
    from diffusers import AutoencoderKL

    decodes, decode = [], AutoencoderKL.decode
    # On the class: the command loads its own VAE.
    monkeypatch.setattr(AutoencoderKL, "decode", lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs))
    image, output = tmp_path / "moving.png", tmp_path / "aligned.png"
    coffee.resize((192, 128)).save(image)
    argv = ["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image)]
    assert cli.main([*argv, "--output", str(output)]) == 0
    assert PIL.Image.open(output).size == (192, 128) and decodes == []
    # --decoded asks for the VAE round trip: then, and only then, the decoder runs.
    assert cli.main([*argv, "--output", str(tmp_path / "decoded.png"), "--decoded"]) == 0
    assert decodes == [1]


@pytest.mark.parametrize("threads", [None, 1])
def test_threads_are_set_for_the_command_only_when_asked(tmp_path, saved_pipeline, coffee, monkeypatch, threads):
    calls, set_num_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or set_num_threads(n))
    used = []
    align_image = cli._align_image
    monkeypatch.setattr(cli, "_align_image", lambda *args: used.append(torch.get_num_threads()) or align_image(*args))
    before = torch.get_num_threads()
    image = tmp_path / "moving.png"
    coffee.resize((192, 128)).save(image)
    argv = ["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image),
            "--output", str(tmp_path / "aligned.png")]  # fmt: skip
    assert cli.main(argv + (["--threads", str(threads)] if threads else [])) == 0
    if threads is None:
        assert calls == [] and used == [before]  # torch's own choice, untouched
    else:
        assert calls == [threads, before] and used == [threads]  # set for the command, then restored
    assert torch.get_num_threads() == before


def test_every_verb_takes_threads_and_refuses_below_one(capsys):
    parser = cli.build_parser()
    verbs = [["align", "--image", "a.png", "--output", "b.png"], ["demo"], ["analyze", "--output", "out"],
             ["evaluate", "--data", "photos"]]  # fmt: skip
    for verb in verbs:
        assert parser.parse_args([*verb, "--threads", "3"]).threads == 3
        assert parser.parse_args(verb).threads is None
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--threads", "0"])
    line = _one_error_line(capsys)
    assert "--threads" in line and ">= 1" in line


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


def test_align_ignore_mask_is_read_upright_and_reaches_the_pipeline(tmp_path, saved_pipeline, coffee, monkeypatch):
    from stn_diffusers import STNAlignmentPipeline

    from .test_images import save_sideways

    given, convert = [], STNAlignmentPipeline._to_ignore_masks
    monkeypatch.setattr(
        STNAlignmentPipeline, "_to_ignore_masks", staticmethod(lambda mask: given.append(convert(mask)) or given[-1])
    )
    image, output = tmp_path / "moving.png", tmp_path / "aligned.png"
    coffee.resize((192, 128)).save(image)
    mask = np.zeros((128, 192), np.uint8)
    mask[10:60, 20:150] = 255  # not symmetric: a mask read sideways differs in size and content
    ignore = save_sideways(PIL.Image.fromarray(mask), tmp_path / "ignore.png")
    argv = ["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image)]
    assert cli.main([*argv, "--output", str(output), "--ignore-mask", str(ignore)]) == 0
    (masks,) = given
    torch.testing.assert_close(masks[0], torch.from_numpy(mask / 255.0).float()[None])


def test_align_ignore_mask_mistakes_are_one_line_before_loading(tmp_path, coffee, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", _fail_if_loaded)
    image, mask = tmp_path / "moving.png", tmp_path / "ignore.png"
    coffee.resize((192, 128)).save(image)
    PIL.Image.new("L", (96, 64), 0).save(mask)  # half the reference's size
    argv = ["align", "--image", str(image), "--output", str(tmp_path / "a.png")]
    assert cli.main([*argv, "--reference", str(image), "--ignore-mask", str(mask)]) == 2
    assert "expected --ignore-mask of the reference's size, 192×128 (it marks" in _one_error_line(capsys)
    assert cli.main([*argv, "--ignore-mask", str(mask)]) == 2
    assert "expected --reference with --ignore-mask" in _one_error_line(capsys)
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------------------ user errors
def _one_error_line(capsys) -> str:
    """The single ``error: ...`` line a user's mistake prints on stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("the pipeline was loaded: the mistake should have been reported before any computation")


@pytest.fixture
def photo_files(tmp_path, astronaut):
    """``(image, reference, mask)`` files and a plain file ``blocker`` that outputs cannot be written under."""
    image, reference, mask = tmp_path / "moving.png", tmp_path / "reference.png", tmp_path / "mask.png"
    astronaut.save(image)
    astronaut.save(reference)
    PIL.Image.new("L", astronaut.size, 255).save(mask)
    (tmp_path / "blocker").write_text("a file, not a folder")
    return image, reference, mask


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--output", "{tmp}/out.xyz"], ["--output", "out.xyz", ".png"]),
        (["--output", "{tmp}/blocker/out.png"], ["--output", "blocker"]),
        (["--output", "{tmp}/a.png", "--json", "{tmp}/blocker/theta.json"], ["--json", "blocker"]),
        (["--output", "{tmp}/moving.png"], ["--output", "--image", "--overwrite"]),
        (["--output", "{tmp}/sub/../reference.png"], ["--output", "--reference", "--overwrite"]),
        (["--output", "{tmp}/a.png", "--json", "{tmp}/reference.png"], ["--json", "--reference"]),
        (["--output", "{tmp}/a.png", "--json", "{tmp}/a.png"], ["--output", "--json", "distinct"]),
        (["--output", "{tmp}/a.png", "--mask", "{tmp}/mask.png", "--output-mask", "{tmp}/mask.png"],
         ["--output-mask", "--mask", "--overwrite"]),
        (["--output", "{tmp}/mask.png", "--ignore-mask", "{tmp}/mask.png"],
         ["--output", "--ignore-mask", "--overwrite"]),
        (["--output", "{tmp}/a.png", "--ignore-mask", "{tmp}/missing.png"], ["ignore mask", "missing.png"]),
        (["--output", "{tmp}/a.png", "--device", "cuda:99"], ["--device", "cuda:99", "cpu"]),
        (["--output", "{tmp}/a.png", "--device", "gpu"], ["--device", "'gpu'"]),
    ],
)  # fmt: skip
def test_align_mistakes_are_one_line_before_any_computation(
    tmp_path, photo_files, monkeypatch, capsys, extra, expected
):
    monkeypatch.setattr(cli, "load_pipeline", _fail_if_loaded)
    before = sorted(tmp_path.rglob("*"))
    argv = ["align", "--image", str(photo_files[0]), "--reference", str(photo_files[1])]
    code = cli.main(argv + [arg.format(tmp=tmp_path) for arg in extra])
    assert code == 2
    line = _one_error_line(capsys)
    assert all(word in line for word in expected), line
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no folder made, no input replaced


def _delete_stn_weights(folder):
    (folder / "stn" / "diffusion_pytorch_model.safetensors").unlink()


def _delete_vae_config(folder):
    (folder / "vae" / "config.json").unlink()


def _truncate_stn_weights(folder):
    weights = folder / "stn" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _delete_model_index(folder):
    (folder / "model_index.json").unlink()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_delete_stn_weights, ["stn", "diffusion_pytorch_model.safetensors"]),
        (_delete_vae_config, ["vae", "config.json"]),
        (_truncate_stn_weights, ["stn", "diffusion_pytorch_model.safetensors", "truncated"]),
        (_delete_model_index, ["--pipeline", "model_index.json"]),
    ],
)
def test_damaged_pipeline_folder_is_named_in_one_line(tmp_path, saved_pipeline, photo_files, capsys, damage, expected):
    damage(saved_pipeline)
    code = cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(photo_files[0]),
                     "--output", str(tmp_path / "out.png")])  # fmt: skip
    assert code == 2
    line = _one_error_line(capsys)
    assert all(word in line for word in expected) and ".bin" not in line, line
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--num-pairs", "0", ">= 1"), ("--num-pairs", "-3", ">= 1"),
        *(("--local-change", value, "[0, 1)") for value in ("1", "1.5", "-0.1", "nan", "a fifth")),
    ],
)  # fmt: skip
def test_evaluate_numbers_out_of_range_are_refused_by_the_parser(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--data", str(tmp_path), "--methods", "identity", flag, value])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert flag in line and expected in line and value in line


def test_evaluate_accepts_every_warp_preset_and_a_local_change_fraction(capsys):
    from stn_diffusers import geometry

    parser = cli.build_parser()
    # "none" included: zero-motion pairs with a local change measure the false motion it causes.
    for warp in geometry.WARP_PRESETS:
        assert parser.parse_args(["evaluate", "--data", "photos", "--warp", warp]).warp == (warp,)
    # The standard report: the training range, the wide basin and aligned pairs, in that order.
    assert parser.parse_args(["evaluate", "--data", "photos"]).warp == ("standard", "large", "none")
    assert parser.parse_args(["evaluate", "--data", "photos", "--warp", "huge, none"]).warp == ("huge", "none")
    assert parser.parse_args(["evaluate", "--data", "photos"]).local_change == 0.0
    assert parser.parse_args(["evaluate", "--data", "photos", "--local-change", "0.2"]).local_change == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--data", "photos", "--warp", "sideways"])
    line = _one_error_line(capsys)
    assert "--warp" in line and "sideways" in line and "large" in line
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--data", "photos", "--warp", "standard,sideways"])
    assert "sideways" in _one_error_line(capsys)


def test_evaluate_passes_the_warp_and_local_change_on(tmp_path, astronaut, monkeypatch):
    from stn_diffusers import evaluation

    given = {}
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: given.update(kwargs) or _EMPTY_REPORT)
    monkeypatch.setattr(evaluation, "markdown_table", lambda report: "table")
    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "astronaut.png")
    argv = ["evaluate", "--data", str(folder), "--methods", "identity", "--warp", "none", "--local-change", "0.25"]
    assert cli.main(argv) == 0
    assert given["warp"] == "none" and given["local_change"] == 0.25


def test_evaluate_writes_one_report_per_warp(tmp_path, astronaut, monkeypatch):
    from stn_diffusers import evaluation

    warps = []
    monkeypatch.setattr(
        evaluation, "evaluate", lambda *args, **kwargs: warps.append(kwargs["warp"]) or {**_EMPTY_REPORT, **kwargs}
    )
    monkeypatch.setattr(evaluation, "markdown_table", lambda report: f"table of {report['warp']}")
    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "astronaut.png")
    out_json, out_md = tmp_path / "report.json", tmp_path / "report.md"
    argv = [
        "evaluate",
        "--data",
        str(folder),
        "--methods",
        "identity",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
    ]
    assert cli.main(argv) == 0
    assert warps == ["standard", "large", "none"]
    assert [report["warp"] for report in json.loads(out_json.read_text())] == warps
    assert out_md.read_text().split("\n\n") == [f"table of {warp}" for warp in warps[:-1]] + ["table of none\n"]


_EMPTY_REPORT = {"methods": {}, "skipped": {}}


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_flag_adds_the_traceback(tmp_path, photo_files, monkeypatch, capsys, position):
    monkeypatch.setattr(cli, "load_pipeline", _fail_if_loaded)
    argv = ["align", "--image", str(photo_files[0]), "--output", str(tmp_path / "a.png"), "--device", "cuda:99"]
    code = cli.main(["--debug", *argv] if position == "before" else [*argv, "--debug"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------------------------------- outputs
def test_align_overwrite_replaces_the_input_atomically(tmp_path, saved_pipeline, coffee):
    image = tmp_path / "photo.png"
    coffee.resize((192, 128)).save(image)  # the smallest this VAE aligns without a warning
    inode = image.stat().st_ino
    code = cli.main(["align", "--pipeline", str(saved_pipeline), "--image", str(image), "--reference", str(image),
                     "--output", str(image), "--overwrite"])  # fmt: skip
    assert code == 0
    assert image.stat().st_ino != inode  # a new file renamed over the input, not the input rewritten in place
    assert PIL.Image.open(image).size == (192, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "pipeline"]  # no temporary file left


# ------------------------------------------------------------------------------------ evaluate
@pytest.fixture
def photo_folder_with_corrupt_file(tmp_path, astronaut):
    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "astronaut.png")
    (folder / "corrupt.png").write_text("not an image")
    return folder


def test_evaluate_checks_outputs_before_computing(tmp_path, photo_folder_with_corrupt_file, monkeypatch, capsys):
    from stn_diffusers import evaluation

    monkeypatch.setattr(evaluation, "evaluate", _fail_if_loaded)
    (tmp_path / "blocker").write_text("a file")
    code = cli.main(["evaluate", "--data", str(photo_folder_with_corrupt_file), "--methods", "identity",
                     "--json", str(tmp_path / "blocker" / "report.json")])  # fmt: skip
    assert code == 2
    assert "--json" in _one_error_line(capsys)


def test_evaluate_writes_reports_and_warns_once_about_unreadable_photos(
    tmp_path, photo_folder_with_corrupt_file, capsys, caplog
):
    report, table = tmp_path / "out" / "report.json", tmp_path / "out" / "table.md"
    with caplog.at_level(logging.WARNING, logger="stn_diffusers.data"):
        code = cli.main(["evaluate", "--data", str(photo_folder_with_corrupt_file), "--methods", "identity",
                         "--num-pairs", "1", "--resolution", "64", "--warp", "standard",
                         "--json", str(report), "--markdown", str(table)])  # fmt: skip
    assert code == 0
    assert json.loads(report.read_text())["methods"]["identity"]["mean"] > 0
    assert "| identity |" in table.read_text(encoding="utf-8")
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "corrupt.png" in warnings[0]
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json", "table.md"]


# ------------------------------------------------------------------------------------- analyze
def test_analyze_checks_its_output_folder_before_computing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", _fail_if_loaded)
    (tmp_path / "report").write_text("a file where the report folder should go")
    assert cli.main(["analyze", "--output", str(tmp_path / "report")]) == 2
    line = _one_error_line(capsys)
    assert "--output" in line and "report" in line
