"""Collect a corpus of real photographs from software packages, without web access.

Every photograph comes from a file shipped inside a package:

- Python packages already installed in the environment: scikit-image (``skimage/data``) and
  matplotlib (``mpl-data/sample_data``);
- Debian packages, fetched with ``apt-get download`` (from the configured apt mirror) and unpacked
  with ``dpkg-deb -x`` into a temporary folder: desktop wallpapers, game and template assets, and the
  OpenCV, SciPy and PyWavelets sample images.

Only photographs are listed (no drawings, renders, logos, charts, microscopy or text pages); every
file was checked by eye. The list is explicit rather than a glob, so that a new package version
cannot change the corpus silently; a listed file that is missing is reported and skipped.

Usage::

    python scripts/fetch_photos.py --output data/photos

Output::

    data/photos/train/<source>--<name>.jpg
    data/photos/heldout/<source>--<name>.jpg
    data/photos/SOURCES.md    one row per package (version, licence, counts), then one per file

Each photo is downscaled so that its shorter side is at most ``--max-short-side`` (1024) pixels and
saved as RGB JPEG (quality 95, no chroma subsampling). Photos whose shorter side is below
``--min-short-side`` (512) are skipped, so that evaluation can take 512x512 crops without upsampling.

The split is by source image: images of one scene (a stereo pair, the two graffiti views) share a
group, and a whole group goes to one side. Groups are ordered by the SHA-256 of ``<source>/<group>``
and the first ``max(round(heldout_fraction * n_groups), min_heldout)`` groups are held out, so the
split is deterministic and does not depend on the machine, the package order or the file system.

Requires ``apt-get`` and ``dpkg-deb`` (Debian or Ubuntu) for the Debian sources; pass ``--no-debian``
to use the installed Python packages only.
"""

import argparse
import bz2
import dataclasses
import hashlib
import importlib.util
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("fetch_photos")

JPEG_QUALITY = 95
# scipy.misc.face() is stored as raw bz2-compressed uint8 pixels of this shape.
SCIPY_FACE_SHAPE = (768, 1024, 3)


@dataclasses.dataclass(frozen=True)
class Photo:
    """One photograph inside a package.

    Attributes:
        path: path relative to the package root (the Python package folder, or the root of the
            unpacked ``.deb``).
        name: output file stem; defaults to the stem of ``path``.
        group: images of the same scene share a group and always land in the same split; defaults to
            ``name``.
        licence: licence of this file where it differs from the package's.
        decoder: ``"pil"`` (any format Pillow reads), ``"npz"`` (array under key ``data``) or
            ``"scipy-face"`` (raw bz2 pixels).
    """

    path: str
    name: str = ""
    group: str = ""
    licence: str = ""
    decoder: str = "pil"

    @property
    def stem(self) -> str:
        return self.name or Path(self.path).stem

    @property
    def group_key(self) -> str:
        return self.group or self.stem


@dataclasses.dataclass(frozen=True)
class Source:
    """A package and the photographs taken from it.

    Attributes:
        package: the Python module name (``kind="python"``) or the Debian package name (``kind="debian"``).
        kind: ``"python"`` or ``"debian"``.
        licence: licence of the photos, from the package's copyright file unless a photo overrides it.
        photos: the photographs, paths relative to the package root.
    """

    package: str
    kind: str
    licence: str
    photos: tuple


def _photos(prefix: str, names: str, **kwargs) -> tuple:
    """Photos ``prefix + name`` for each whitespace-separated name, sharing ``kwargs``."""
    return tuple(Photo(prefix + name, **kwargs) for name in names.split())


PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"
LOMIRI_16 = "usr/share/backgrounds/"
OPENCV = "usr/share/doc/opencv-doc/examples/"

SOURCES = (
    Source(
        "skimage",
        "python",
        "per file (scikit-image data docstrings)",
        (
            Photo("data/astronaut.png", licence="public domain (NASA)"),
            Photo("data/camera.png", licence="CC0-1.0 (Lav Varshney)"),
            Photo("data/brick.png", licence="CC0-1.0 (CC0Textures)"),
            Photo("data/grass.png", licence="CC0-1.0 (CC0Textures)"),
            Photo("data/gravel.png", licence="CC0-1.0 (CC0Textures)"),
            # No licence of its own is stated; it ships under scikit-image's licence.
            Photo("data/moon.png", licence="BSD-3-Clause (scikit-image)"),
        ),
    ),
    Source(
        "matplotlib",
        "python",
        "public domain (U.S. Navy photograph)",
        (Photo("mpl-data/sample_data/grace_hopper.jpg"),),
    ),
    Source(
        "python3-scipy",
        "debian",
        "BSD-3-Clause (SciPy)",
        (Photo("usr/lib/python3/dist-packages/scipy/misc/face.dat", name="face", decoder="scipy-face"),),
    ),
    Source(
        "python3-pywt",
        "debian",
        "MIT (PyWavelets)",
        (
            Photo("usr/lib/python3/dist-packages/pywt/data/ascent.npz", decoder="npz", licence="public domain"),
            Photo("usr/lib/python3/dist-packages/pywt/data/aero.npz", decoder="npz"),
        ),
    ),
    Source(
        "opencv-doc",
        "debian",
        "Apache-2.0 AND BSD-3-Clause (OpenCV samples)",
        _photos(OPENCV + "data/", "apple.jpg orange.jpg baboon.jpg building.jpg")
        + _photos(OPENCV + "data/", "aloeL.jpg aloeR.jpg", group="aloe")
        + _photos(OPENCV + "data/", "ela_original.jpg ela_modified.jpg", group="ela")
        + _photos(OPENCV + "data/", "graf1.png graf3.png", group="graf")
        + _photos(OPENCV + "data/", "leuvenA.jpg leuvenB.jpg", group="leuven")
        # Street scenes with signs: photographs, not text pages.
        + _photos(OPENCV + "text/", "scenetext01.jpg scenetext02.jpg scenetext03.jpg scenetext04.jpg scenetext05.jpg"),
    ),
    Source(
        "plasma-workspace-wallpapers",
        "debian",
        "LGPL-3.0 (per-wallpaper metadata.json)",
        tuple(
            Photo(PLASMA.format(name), name=name)
            for name in (
                "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path"
                " summer_1am"
            ).split()
        ),
    ),
    Source(
        "lomiri-wallpapers-16.04",
        "debian",
        "per file (debian/copyright)",
        _photos(
            LOMIRI_16,
            "aitzgorri_by_Aitzol_Berasategi.jpg friends_by_Aitzol_Berasategi.jpg life_by_Aitzol_Berasategi.jpg"
            " picosdeeuropa_by_Aitzol_Berasategi.jpg sunset_by_Aitzol_Berasategi.jpg"
            " Picture_0B_by_freespace.jpg Picture_1A_by_freespace.jpg Wine_by_Jakkub_Mede.jpg",
            licence="CC-BY-4.0",
        )
        + _photos(
            LOMIRI_16,
            "Bridge_by_Sander_Klootwijk.jpg Dragonfly_by_Bolly.jpg free_by_Peter_Nerlich.jpg"
            " greentock_by_Peter_Nerlich.jpg",
            licence="CC-BY-SA-4.0",
        )
        + (Photo(LOMIRI_16 + "seeding_by_Clements_Engelhardt.jpg", licence="CC0-1.0"),),
    ),
    Source(
        "lomiri-wallpapers-20.04",
        "debian",
        "CC-BY-SA-3.0",
        (Photo("usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"),),
    ),
    Source(
        "mate-backgrounds",
        "debian",
        "GPL-2.0+",
        _photos(
            "usr/share/backgrounds/mate/nature/",
            "Aqua.jpg Blinds.jpg Dune.jpg FreshFlower.jpg Garden.jpg GreenMeadow.jpg LadyBird.jpg RainDrops.jpg"
            " Storm.jpg TwoWings.jpg Wood.jpg YellowFlower.jpg",
        ),
    ),
    Source(
        "lxqt-themes",
        "debian",
        "LGPL-2.1+",
        _photos(
            "usr/share/lxqt/wallpapers/",
            "Butterfly-Kenneth-Wimer.jpg Valendas.png after-the-rain.jpg appleflower.png beam.png butterfly.png"
            " cloud.png drop.png flowers.png fog.jpg this-is-not-windows.jpg",
        ),
    ),
    Source(
        "palapeli-data",
        "debian",
        "per file (puzzle .desktop files)",
        _photos("usr/share/palapeli/collection/", "castle-maintenon.jpg panther-chameleon-female.jpg", licence="GFDL")
        + _photos(
            "usr/share/palapeli/collection/",
            "cincinnati-bridge.jpg citrus-fruits.jpg european-honey-bee.jpg",
            licence="public domain",
        ),
    ),
    Source(
        "tuxpaint-data",
        "debian",
        "GPL-2.0+",
        _photos(
            "usr/share/tuxpaint/templates/",
            "burnt_bark.jpg cliff.jpg corn_maze.jpg jellyfish.jpg lighthouse.jpg mossy_log.jpg mudstone.jpg"
            " ocean_splash.jpg ocean_waves.jpg redwoods_above.jpg rocks.jpg sheep.jpg spiders_web.jpg"
            " sun_behind_clouds.jpg sun_behind_leaves.jpg",
        ),
    ),
    Source(
        "sddm-theme-maldives",
        "debian",
        "CC-BY-3.0 (Nevit Dilmen)",
        (Photo("usr/share/sddm/themes/maldives/background.jpg", name="maldives"),),
    ),
    Source(
        "scribus-template",
        "debian",
        "public domain (Riku Leino)",
        (
            Photo("usr/share/scribus/templates/cal2/moon.jpg", name="moon_branches"),
            Photo("usr/share/scribus/templates/menu2/pizza.jpg"),
        )
        + _photos("usr/share/scribus/templates/br2/", "brightness.jpg halfmoon.jpg moon.jpg nature.jpg sunset.jpg"),
    ),
    Source(
        "digikam-data",
        "debian",
        "GPL-2.0+",
        (Photo("usr/share/digikam/about/images/body-background.jpg", name="lake"),),
    ),
    Source(
        "python-kivy-examples",
        "debian",
        "MIT (Kivy)",
        _photos("usr/share/kivy-examples/demo/pictures/images/", "faust_github.jpg Wall.jpg"),
    ),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("data/photos"), help="Corpus folder.")
    parser.add_argument(
        "--max-short-side", type=int, default=1024, help="Downscale so the shorter side is at most this."
    )
    parser.add_argument("--min-short-side", type=int, default=512, help="Skip photos whose shorter side is smaller.")
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="Fraction of source groups held out.")
    parser.add_argument("--min-heldout", type=int, default=24, help="Hold out at least this many groups.")
    parser.add_argument("--no-debian", action="store_true", help="Use the installed Python packages only.")
    parser.add_argument("--no-apt-update", action="store_true", help="Do not run `apt-get update` first.")
    parser.add_argument(
        "--deb-cache", type=Path, default=None, help="Keep downloaded .deb files here (default: a temporary folder)."
    )
    return parser.parse_args(argv)


def python_package_root(module: str) -> tuple[Path, str]:
    """The folder of an installed Python package and its version."""
    from importlib.metadata import version

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"expected an installed Python package named {module!r}")
    distribution = {"skimage": "scikit-image"}.get(module, module)
    return Path(list(spec.submodule_search_locations)[0]), version(distribution)


def debian_package_root(package: str, deb_dir: Path, unpack_dir: Path) -> tuple[Path, str]:
    """Download ``package`` with apt-get (unless already in ``deb_dir``) and unpack it; returns (root, version)."""
    debs = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not debs:
        result = subprocess.run(["apt-get", "download", package], cwd=deb_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
        debs = sorted(deb_dir.glob(f"{package}_*.deb"))
    deb = debs[-1]
    root = unpack_dir / package
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    deb_version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return root, deb_version


def load_photo(path: Path, decoder: str) -> Image.Image:
    """Read one photo as an RGB PIL image; transparency is composited onto white."""
    if decoder == "npz":
        with np.load(path, allow_pickle=False) as archive:
            image = Image.fromarray(archive["data"])
    elif decoder == "scipy-face":
        pixels = np.frombuffer(bz2.decompress(path.read_bytes()), dtype=np.uint8)
        image = Image.fromarray(pixels.reshape(SCIPY_FACE_SHAPE))
    elif decoder == "pil":
        image = Image.open(path)
        image.load()
        image = ImageOps.exif_transpose(image)  # photos are stored upright, as a viewer shows them
    else:
        raise ValueError(f"expected decoder 'pil', 'npz' or 'scipy-face', got {decoder!r}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


def downscale(image: Image.Image, max_short_side: int) -> Image.Image:
    """Resize (Lanczos) so that the shorter side is at most ``max_short_side``; never upsamples."""
    width, height = image.size
    scale = max_short_side / min(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def split_groups(group_keys: list[str], heldout_fraction: float, min_heldout: int) -> set[str]:
    """The held-out group keys: the first ones in SHA-256 order (see the module docstring)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"expected heldout_fraction in (0, 1), got {heldout_fraction}")
    keys = sorted(set(group_keys), key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    count = min(max(round(heldout_fraction * len(keys)), min_heldout), len(keys) - 1)
    return set(keys[:count])


def write_sources(output: Path, records: list[dict], versions: dict[str, str]) -> None:
    """Write SOURCES.md: one row per package, then one per file."""
    lines = [
        "# Photo corpus sources",
        "",
        "Written by `scripts/fetch_photos.py`. Every photograph comes from a file inside the package named;",
        "the licence is the one stated for that file by the package (its Debian `copyright` file, the",
        "wallpaper metadata or the library's documentation). Photos are downscaled copies.",
        "",
        "| Source | Version | Licence | Files | train | heldout |",
        "|---|---|---|---|---|---|",
    ]
    for source in SOURCES:
        rows = [r for r in records if r["source"] == source.package]
        if not rows:
            continue
        licences = sorted({r["licence"] for r in rows})
        licence = licences[0] if len(licences) == 1 else source.licence
        train = sum(r["split"] == "train" for r in rows)
        kind = "Debian" if source.kind == "debian" else "Python"
        lines.append(
            f"| {source.package} ({kind}) | {versions[source.package]} | {licence} | {len(rows)} | {train} "
            f"| {len(rows) - train} |"
        )
    train = sum(r["split"] == "train" for r in records)
    lines += [
        f"| **total** | | | {len(records)} | {train} | {len(records) - train} |",
        "",
        "## Files",
        "",
        "| File | Split | Size | Source | Path in package | Licence |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["split"], r["file"])):
        lines.append(
            f"| {r['file']} | {r['split']} | {r['size'][0]}x{r['size'][1]} | {r['source']} | `{r['path']}` "
            f"| {r['licence']} |"
        )
    (output / "SOURCES.md").write_text("\n".join(lines) + "\n")


def collect(sources: list[Source], work: Path, deb_dir: Path, args) -> tuple[list[dict], dict[str, str]]:
    """Load, filter and downscale every listed photo, saving each as JPEG under ``work / "photos"``.

    Returns one record per saved photo and the version of each source that could be read.
    """
    staging = work / "photos"
    staging.mkdir()
    records, versions = [], {}
    for source in sources:
        try:
            if source.kind == "python":
                root, versions[source.package] = python_package_root(source.package)
            else:
                root, versions[source.package] = debian_package_root(source.package, deb_dir, work / "unpacked")
        except (RuntimeError, ValueError, subprocess.CalledProcessError) as error:
            logger.warning("skipping %s: %s", source.package, error)
            continue
        for photo in source.photos:
            path = root / photo.path
            if not path.is_file():
                logger.warning("skipping %s: %s not found in this version", source.package, photo.path)
                continue
            image = load_photo(path, photo.decoder)
            if min(image.size) < args.min_short_side:
                logger.warning("skipping %s: %s is smaller than %d px", source.package, photo.path, args.min_short_side)
                continue
            image = downscale(image, args.max_short_side)
            file = f"{source.package}--{photo.stem}.jpg"
            image.save(staging / file, quality=JPEG_QUALITY, subsampling=0)
            records.append(
                {
                    "file": file,
                    "group": f"{source.package}/{photo.group_key}",
                    "size": image.size,
                    "source": source.package,
                    "path": photo.path,
                    "licence": photo.licence or source.licence,
                }
            )
        logger.info("%-28s %s", source.package, versions[source.package])
        # A large package unpacked is hundreds of MB: free it before the next one.
        shutil.rmtree(work / "unpacked", ignore_errors=True)
    return records, versions


def main(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = [s for s in SOURCES if not (args.no_debian and s.kind == "debian")]
    if not args.no_debian and not args.no_apt_update:
        logger.info("apt-get update")
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)

    work = Path(tempfile.mkdtemp(prefix="fetch_photos_"))
    try:
        deb_dir = args.deb_cache or work / "debs"
        deb_dir.mkdir(parents=True, exist_ok=True)
        records, versions = collect(sources, work, deb_dir, args)
        if not records:
            raise RuntimeError("no photos were collected")
        heldout = split_groups([r["group"] for r in records], args.heldout_fraction, args.min_heldout)

        for split in ("train", "heldout"):
            (args.output / split).mkdir(parents=True, exist_ok=True)
            # The split folders hold only generated files: clear them so a rerun leaves no stale photos.
            for stale in (args.output / split).glob("*.jpg"):
                stale.unlink()
        for record in records:
            record["split"] = "heldout" if record["group"] in heldout else "train"
            shutil.move(work / "photos" / record["file"], args.output / record["split"] / record["file"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_sources(args.output, records, versions)
    n_heldout = sum(r["split"] == "heldout" for r in records)
    logger.info(
        "%d photos from %d sources in %d groups: %d train, %d held out (%d groups) -> %s",
        len(records), len(versions), len({r["group"] for r in records}), len(records) - n_heldout, n_heldout,
        len(heldout), args.output,
    )


if __name__ == "__main__":
    main(parse_args())
