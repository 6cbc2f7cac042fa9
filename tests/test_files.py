import os

import PIL.Image
import pytest
from matplotlib.figure import Figure

from stn_diffusers import files


def _fail_after_writing_half(partial):
    partial.write_text("half")
    raise OSError("disk full")


def _figure() -> Figure:
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    return figure


class TestWriteOutputs:
    def test_writes_all_or_none(self, tmp_path, astronaut):
        first, second = tmp_path / "first.txt", tmp_path / "second.jpg"
        first.write_text("old")

        with pytest.raises(OSError, match="disk full"):
            files.write_outputs({first: files.text_writer("new"), second: _fail_after_writing_half})
        assert first.read_text() == "old" and not second.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["first.txt"]  # no temporary file left behind

        files.write_outputs({first: files.text_writer("new"), second: files.image_writer(astronaut, second)})
        assert first.read_text() == "new"
        with PIL.Image.open(second) as written:
            assert written.format == "JPEG"  # chosen from the final name, not the temporary one
        assert sorted(p.name for p in tmp_path.iterdir()) == ["first.txt", "second.jpg"]

    def test_replaces_an_existing_file_by_renaming_a_new_one_over_it(self, tmp_path):
        path = tmp_path / "report.md"
        path.write_text("old")
        inode = path.stat().st_ino
        files.write_outputs({path: files.text_writer("new")})
        assert path.read_text() == "new" and path.stat().st_ino != inode

    def test_figure_is_saved_in_the_format_of_its_final_name(self, tmp_path):
        png, svg = tmp_path / "plot.png", tmp_path / "plot.svg"
        figure = _figure()
        files.write_outputs({png: files.figure_writer(figure, png, dpi=50), svg: files.figure_writer(figure, svg)})
        with PIL.Image.open(png) as written:
            assert written.format == "PNG" and written.size == (100, 100)  # 2 inches at dpi=50
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


class TestFormats:
    def test_unknown_image_extension_names_the_label_and_path(self):
        with pytest.raises(ValueError, match=r"--output.*\.png.*out\.xyz"):
            files.image_format("out.xyz", "--output")
        assert files.image_format("OUT.JPG") == "JPEG"

    def test_unknown_figure_extension_is_refused_before_writing(self, tmp_path):
        with pytest.raises(ValueError, match=r"matplotlib.*\.png.*curves\.xyz"):
            files.figure_writer(_figure(), tmp_path / "curves.xyz")
        assert list(tmp_path.iterdir()) == []


class TestChecks:
    def test_same_file_sees_through_dot_dot_and_hard_links(self, tmp_path):
        original = tmp_path / "a.png"
        original.write_text("x")
        os.link(original, tmp_path / "link.png")
        assert files.same_file(tmp_path / "sub" / ".." / "a.png", original)
        assert files.same_file(tmp_path / "link.png", original)
        assert not files.same_file(tmp_path / "b.png", original)

    def test_outputs_must_differ_from_inputs_unless_overwrite(self, tmp_path):
        source = tmp_path / "photo.png"
        source.write_text("x")
        with pytest.raises(ValueError, match="--output to differ from --image.*pass --overwrite"):
            files.check_outputs({"--output": source}, inputs={"--image": source}, overwrite_label="--overwrite")
        files.check_outputs({"--output": source}, inputs={"--image": source}, overwrite=True)

    def test_outputs_must_be_distinct_files_in_writable_folders(self, tmp_path):
        with pytest.raises(ValueError, match="distinct output files.*--json and --markdown"):
            files.check_outputs({"--json": tmp_path / "a.txt", "--markdown": tmp_path / "a.txt"})
        (tmp_path / "blocker").write_text("a file, not a folder")
        with pytest.raises(NotADirectoryError, match="--json.*blocker"):
            files.check_outputs({"--json": tmp_path / "blocker" / "report.json"})
        with pytest.raises(IsADirectoryError, match="--json"):
            files.check_outputs({"--json": tmp_path})
        files.check_outputs({"--json": tmp_path / "new" / "report.json", "--markdown": None})
        assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # made, probe removed

    def test_output_folder_may_not_be_a_file(self, tmp_path):
        (tmp_path / "report").write_text("a file")
        with pytest.raises(NotADirectoryError, match="output_dir.*report"):
            files.check_output_folder(tmp_path / "report", "output_dir")
        files.check_output_folder(tmp_path / "deep" / "report")
        assert (tmp_path / "deep" / "report").is_dir()
