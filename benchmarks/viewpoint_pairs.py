"""Real viewpoint changes with a ground-truth homography: OpenCV's graffiti pair.

    python benchmarks/viewpoint_pairs.py --pipeline default=stn_diffusers/weights/default \
        --pipeline homography=data/homography_run --json benchmarks/results/viewpoint_pairs.json

`graf1.png`, `graf3.png` and `H1to3p.xml` (the homography from the first view to the third, about
40° out of plane) ship in Debian's `opencv-doc`; the script fetches it with `apt-get download` into a
temporary folder (or reads `--opencv-doc DIR`, an unpacked copy). Two pairs: graf3 aligned onto
graf1 (the truth is H1to3 in OpenCV's inverse-map convention) and graf1 onto graf3 (its inverse),
at the photos' own 800×640. Error: mean corner error against the truth in pixels at 800×640.
Methods: each pipeline alone and followed by ECC (in its own motion model), ECC and SIFT + RANSAC
with a homography (`ecc-homography`, `sift-homography`) and their affine versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from stn_diffusers import geometry, metrics  # noqa: E402
from stn_diffusers.cli import load_pipeline  # noqa: E402
from stn_diffusers.data import Pair  # noqa: E402
from stn_diffusers.evaluation import evaluate_classical, evaluate_stn  # noqa: E402

CLASSICAL = ("ecc", "ecc-homography", "sift", "sift-homography")
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"


def opencv_doc(folder: str | None) -> Path:
    """The folder holding graf1.png, graf3.png and H1to3p.xml: ``folder``, or an unpacked `opencv-doc`."""
    if folder is not None:
        return Path(folder)
    unpack = Path(tempfile.mkdtemp(prefix="opencv-doc-"))
    subprocess.run(["apt-get", "download", "opencv-doc"], cwd=unpack, check=True, capture_output=True)
    deb = next(unpack.glob("opencv-doc_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack / "root")], check=True)
    return unpack / "root" / OPENCV_DATA


def read_homography(path: Path) -> np.ndarray:
    import cv2

    storage = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    node = storage.getFirstTopLevelNode()
    matrix = node.mat() if node.isMap() is False else None
    if matrix is None:  # some OpenCV versions store the matrix as plain text rows
        matrix = np.array([float(v) for v in path.read_text().split() if _is_number(v)][-9:]).reshape(3, 3)
    return matrix.astype(np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--opencv-doc", default=None, help="an unpacked opencv-doc data folder (default: fetched)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = opencv_doc(args.opencv_doc)
    graf1, graf3 = load_rgb(folder / "graf1.png"), load_rgb(folder / "graf3.png")
    height, width = graf1.shape[-2:]
    h1to3 = torch.from_numpy(read_homography(folder / "H1to3p.xml"))[None]
    truth = geometry.pixel_matrix_to_theta(h1to3, height, width, "homography")[0].float()
    pairs = [
        Pair(reference=graf1, moving=graf3, theta=truth, name="graf3 → graf1"),
        Pair(reference=graf3, moving=graf1, theta=geometry.invert_theta(truth[None])[0], name="graf1 → graf3"),
    ]
    results = {}
    for spec in args.pipeline:
        name, _, path = spec.partition("=")
        for key, result in evaluate_stn(load_pipeline(path, "cpu"), pairs, refine=True).items():
            results[key.replace("stn", name)] = result.errors
    for method in CLASSICAL:
        results[method] = evaluate_classical(method, pairs).errors
    header = ["method", *(pair.name for pair in pairs), "mean"]
    rows = [[name, *(f"{e:.2f}" for e in errors), f"{np.mean(errors):.2f}"] for name, errors in results.items()]
    print(f"graf1 / graf3 ({width}×{height}), mean corner error in pixels against H1to3p.xml.\n")
    print(metrics.markdown_table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": [p.name for p in pairs], "errors": results}, indent=2))


if __name__ == "__main__":
    main()
