"""Hugging Face datasets as photo sources (fine-tuning, evaluation) and as pair lists (`align --dataset`):
local datasets only, written with `save_to_disk` or as an `imagefolder` folder."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from safetensors.torch import load_file

from stn_diffusers import cli, data, finetune

from .conftest import make_tiny_vae
from .test_batch_align import read_results, save_small_pipeline, shifted_pair
from .test_finetune import SMALL_REGISTRATION

datasets = pytest.importorskip("datasets")

PHOTOS = {"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee, "chelsea": skimage.data.chelsea}
SHIFTS = [(6, 0), (0, -4), (3, 3)]


def photo(name: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(PHOTOS[name]())


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    """A dataset saved with ``save_to_disk``: split ``train`` holds the three photos in ``image``;
    split ``pairs`` holds a shifted pair per row (``image`` onto ``reference``, shifted by ``SHIFTS``)
    with an ignore mask, and a last row whose image is not one."""
    features = datasets.Features({"image": datasets.Image(), "reference": datasets.Image(), "mask": datasets.Image()})
    train = datasets.Dataset.from_dict(
        {"image": [photo(name) for name in PHOTOS], "reference": [photo("coffee")] * 3,
         "mask": [PIL.Image.new("L", (8, 8))] * 3},
        features=features,
    )  # fmt: skip
    pairs = [shifted_pair(dx, dy) for dx, dy in SHIFTS]
    mask = PIL.Image.new("L", (160, 128), 0)
    rows = {
        "image": [moving for moving, _ in pairs] + [{"bytes": b"not an image", "path": None}],
        "reference": [reference for _, reference in pairs] + [pairs[0][1]],
        "mask": [mask] * 4,
    }
    folder = tmp_path_factory.mktemp("datasets") / "saved"
    splits = {"train": train, "pairs": datasets.Dataset.from_dict(rows, features=features)}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """The dataset's training photos as files, in the same order (file names sort like the rows)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, name in enumerate(PHOTOS):
        photo(name).save(folder / f"{index}_{name}.png")
    return folder


# ----------------------------------------------------------------------------------- photo sources
class TestLoadPhotoDataset:
    def test_a_column_gives_the_photos_of_a_folder_of_the_same_files(self, saved_dataset, photo_folder):
        from_dataset, names, files = data.load_photos(dataset=saved_dataset)
        from_folder, _, paths = data.load_photos(photo_folder)
        assert len(from_dataset) == 3 and all(torch.equal(a, b) for a, b in zip(from_dataset, from_folder))
        assert names == ["image[0]", "image[1]", "image[2]"] and files == [None] * 3
        assert [path.name for path in paths] == ["0_astronaut.png", "1_coffee.png", "2_chelsea.png"]
        with pytest.raises(ValueError, match="one of them"):
            data.load_photos(photo_folder, saved_dataset)

    def test_an_imagefolder_folder_is_read_with_file_names(self, photo_folder, monkeypatch, tmp_path):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
        images, names = data.load_photo_dataset(photo_folder)
        assert names == ["0_astronaut.png", "1_coffee.png", "2_chelsea.png"]
        assert images[1].shape == (3, 400, 600)

    def test_unknown_columns_and_splits_are_named(self, saved_dataset):
        with pytest.raises(ValueError, match=r"column 'photo'.*image, reference, mask"):
            data.load_photo_dataset(saved_dataset, "photo")
        with pytest.raises(ValueError, match=r"split 'validation'.*\['pairs', 'train'\]"):
            data.load_photo_dataset(saved_dataset, split="validation")
        with pytest.raises(ValueError, match="missing"):
            data.load_photo_dataset(saved_dataset.parent / "missing" / "folder")

    def test_unreadable_cells_are_skipped_in_one_warning_or_raise_when_strict(self, saved_dataset, caplog):
        with caplog.at_level(logging.WARNING, logger="stn_diffusers.data"):
            images, names = data.load_photo_dataset(saved_dataset, split="pairs")
        assert len(images) == 3 and names == ["image[0]", "image[1]", "image[2]"]
        warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(warnings) == 1 and "image[3]" in warnings[0]
        with pytest.raises(ValueError, match=r"row 3 \(image\[3\]\)"):
            data.load_photo_dataset(saved_dataset, split="pairs", strict=True)

    def test_without_the_datasets_library_the_error_names_the_extra(self, saved_dataset, monkeypatch):
        monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
        with pytest.raises(ImportError, match=r'pip install "stn-diffusers\[datasets\]"'):
            data.load_photo_dataset(saved_dataset)

    def test_the_cache_key_of_a_photo_without_a_file_follows_its_pixels(self):
        settings = data.PoolSettings(resolution=64)
        first = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
        same, changed = first.clone(), first.clone()
        changed[0, 0, 0] += 0.5
        assert data.cache_key(first, settings, "vae") == data.cache_key(same, settings, "vae")
        assert data.cache_key(changed, settings, "vae") != data.cache_key(first, settings, "vae")
        assert data.cache_key(first, settings, "other vae") != data.cache_key(first, settings, "vae")


# ----------------------------------------------------------------------------------------- evaluate
class TestEvaluate:
    def test_dataset_name_evaluates_on_the_photos_of_its_split(self, saved_dataset, photo_folder, monkeypatch):
        from stn_diffusers import evaluation

        given = []
        monkeypatch.setattr(
            evaluation, "evaluate", lambda pipelines, sources, **kwargs: given.append((sources, kwargs["names"])) or {}
        )
        monkeypatch.setattr(evaluation, "markdown_table", lambda report: "table")
        base = ["evaluate", "--methods", "identity", "--warp", "standard"]
        assert cli.main([*base, "--dataset_name", str(saved_dataset)]) == 0
        assert cli.main([*base, "--data", str(photo_folder)]) == 0
        assert cli.main([*base, "--dataset-name", str(saved_dataset), "--dataset_split", "pairs"]) == 0
        (train, train_names), (folder, _), (pairs, pair_names) = given
        assert all(torch.equal(a, b) for a, b in zip(train, folder)) and len(train) == 3
        assert train_names == ["image[0]", "image[1]", "image[2]"]
        assert [tuple(p.shape) for p in pairs] == [(3, 128, 160)] * 3 and len(pair_names) == 3

    def test_a_report_from_a_dataset(self, saved_dataset, tmp_path):
        report = tmp_path / "report.json"
        argv = ["evaluate", "--dataset_name", str(saved_dataset), "--image_column", "reference", "--methods",
                "identity", "--num-pairs", "2", "--resolution", "64", "--warp", "standard",
                "--json", str(report)]  # fmt: skip
        assert cli.main(argv) == 0
        assert json.loads(report.read_text())["methods"]["identity"]["mean"] > 0

    def test_data_and_dataset_name_are_one_or_the_other(self, saved_dataset, tmp_path, capsys):
        with pytest.raises(SystemExit):
            cli.main(["evaluate", "--data", str(tmp_path), "--dataset_name", str(saved_dataset)])
        assert "not allowed with argument" in capsys.readouterr().err
        assert cli.main(["evaluate", "--methods", "identity", "--dataset_name", str(saved_dataset),
                         "--image_column", "label"]) == 2  # fmt: skip
        assert "column 'label'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- finetune
@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """The tiny VAE saved to a folder, beside the small STN's config (``stn.json``)."""
    folder = tmp_path_factory.mktemp("vae") / "vae"
    make_tiny_vae().save_pretrained(folder)
    (folder.parent / "stn.json").write_text(json.dumps(SMALL_REGISTRATION))
    return folder


class TestFinetune:
    def argv(self, vae_folder: Path, output: Path, *source: str) -> list[str]:
        return [
            "--pretrained_vae_name_or_path", str(vae_folder), "--output_dir", str(output),
            "--stn_config", str(vae_folder.parent / "stn.json"), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "2", "--pairs_per_image", "2", "--lr_warmup_steps", "1", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--num_validation_pairs", "2", "--report_to", "none", *source,
        ]  # fmt: skip

    def test_dataset_name_trains_as_a_folder_of_the_same_photos(
        self, saved_dataset, photo_folder, vae_folder, tmp_path
    ):
        dataset_argv = self.argv(vae_folder, tmp_path / "a", "--dataset_name", str(saved_dataset))
        folder_argv = self.argv(vae_folder, tmp_path / "b", "--train_data_dir", str(photo_folder))
        from_dataset = finetune.main(finetune.parse_args(dataset_argv))
        from_folder = finetune.main(finetune.parse_args(folder_argv))
        weights = Path("stn") / "diffusion_pytorch_model.safetensors"
        first, second = load_file(from_dataset / weights), load_file(from_folder / weights)
        assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
        card = (from_dataset / "README.md").read_text()
        assert f"split `train` of the dataset `{saved_dataset}`" in card and "3 training photos" in card
        # The latent cache knows a dataset's photos by their pixels, one entry per photo.
        assert len(list((from_dataset / finetune.CACHE_DIR).iterdir())) == 3

    def test_validation_split_holds_out_another_split(self, saved_dataset, vae_folder, tmp_path):
        argv = self.argv(vae_folder, tmp_path / "out", "--dataset_name", str(saved_dataset), "--validation_split",
                         "pairs")  # fmt: skip
        output = finetune.main(finetune.parse_args(argv))
        assert "split `pairs` of the dataset" in (output / "README.md").read_text()

    def test_dataset_flags_are_checked(self, saved_dataset, photo_folder, vae_folder, tmp_path):
        both = self.argv(vae_folder, tmp_path, "--dataset_name", "x", "--train_data_dir", str(photo_folder))
        with pytest.raises(ValueError, match="--train_data_dir or --dataset_name.*both"):
            finetune.parse_args(both)
        with pytest.raises(ValueError, match="--train_data_dir or --dataset_name.*neither"):
            finetune.parse_args(self.argv(vae_folder, tmp_path))
        with pytest.raises(ValueError, match="--validation_split with --dataset_name"):
            finetune.parse_args(self.argv(vae_folder, tmp_path, "--train_data_dir", "x", "--validation_split", "test"))
        missing = self.argv(vae_folder, tmp_path / "out", "--dataset_name", str(saved_dataset), "--image_column", "x")
        with pytest.raises(ValueError, match="--dataset_name: .*column 'x'"):
            finetune.main(finetune.parse_args(missing))
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- align --dataset
@pytest.fixture
def small_pipeline(tmp_path) -> Path:
    return save_small_pipeline(tmp_path / "pipeline")


def test_align_dataset_aligns_each_row_onto_its_reference(saved_dataset, small_pipeline, tmp_path, capsys):
    output = tmp_path / "aligned"
    argv = ["align", "--pipeline", str(small_pipeline), "--dataset", str(saved_dataset), "--split", "pairs",
            "--image-column", "image", "--reference-column", "reference", "--mask-column", "mask",
            "--output-dir", str(output), "--refine", "ecc"]  # fmt: skip
    assert cli.main(argv) == 0
    records = read_results(output)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["image"] for r in records] == ["image[0]", "image[1]", "image[2]", "image[3]"]
    for record, (dx, dy) in zip(records, SHIFTS):
        np.testing.assert_allclose(np.array(record["pixel_matrix"])[:2, 2], [-dx, -dy], atol=0.2)
        assert record["mask"] == "mask[%d]" % record["index"]
        assert PIL.Image.open(output / record["output"]).size == (160, 128)
    assert "row 3 of the column 'image'" in records[3]["error"]
    assert "aligned 3 pair(s), 1 failed" in capsys.readouterr().out
