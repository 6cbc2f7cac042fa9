"""Write the notebooks in this folder, without outputs, from the cells below.

    python notebooks/make_notebooks.py

Edit the cells here, not the ``.ipynb`` files, so the notebooks stay consistent with each other.
Every notebook reads two environment variables, so the test suite can run it offline on tiny
local models: ``STN_DIFFUSERS_PIPELINE`` (a saved pipeline folder; unset: the embedded default)
and, for fine-tuning, ``STN_DIFFUSERS_VAE`` and ``STN_DIFFUSERS_DATA``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS_DIR = Path(__file__).resolve().parent
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}

SETUP = """\
import os

# A saved STNAlignmentPipeline folder; unset loads the embedded default pipeline.
PIPELINE = os.environ.get("STN_DIFFUSERS_PIPELINE")"""

QUICKSTART = [
    new_markdown_cell(
        "# Quick start: align two photos\n\n"
        "Load a pipeline (the embedded default, or a folder saved with `save_pretrained`), align a real pair "
        "of photos (two views of an aloe plant from OpenCV's sample data) and look at the result."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "from stn_diffusers.cli import load_pipeline\n"
        "from stn_diffusers.data import ASSETS, REAL_PAIR\n"
        "from stn_diffusers.images import load_image\n\n"
        "pipe = load_pipeline(PIPELINE)\n"
        "reference, moving = (load_image(ASSETS / name) for name in REAL_PAIR)\n"
        "print(pipe.stn.config.architecture, pipe.stn.config.conditioning, reference.size, moving.size)"
    ),
    new_code_cell(
        "out = pipe(moving, reference=reference)\n"
        "print('theta (normalised, output → input):')\n"
        "print(out.theta[0].numpy().round(4))\n"
        "print(f'mean corner motion: {float(out.displacement[0]):.2f} px')"
    ),
    new_markdown_cell(
        "`warped_images` is the original photo warped at full resolution (no VAE loss); `images` is the aligned "
        "latents decoded by the VAE."
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n\n"
        "panels = {\n"
        "    'reference': reference, 'moving': moving,\n"
        "    'aligned (pixel warp)': out.warped_images[0], 'aligned (decoded)': out.images[0],\n"
        "}\n"
        "figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))\n"
        "for axis, (title, image) in zip(axes, panels.items()):\n"
        "    axis.imshow(image)\n"
        "    axis.set_title(title)\n"
        "    axis.axis('off')\n"
        "plt.show()"
    ),
]

ANALYZE = [
    new_markdown_cell(
        "# Analyse a spatial transformer\n\n"
        "The same report as `stn-diffusers analyze --pipeline DIR --output REPORT_DIR`, inline: layer shapes and "
        "parameters, the identity check on zero-misalignment pairs, gradient flow for one batch of the corner-error "
        "loss, predicted vs true θ on seeded pairs from real photos, a visual grid, and training curves when the "
        "pipeline folder holds `metrics.jsonl`."
    ),
    new_code_cell(
        SETUP.replace("import os\n", "import os\n\nfrom IPython.display import Image, Markdown, display\n") + "\n"
        "# A folder of photos to cut pairs from; unset uses the photos bundled with the package.\n"
        "DATA = os.environ.get(\"STN_DIFFUSERS_DATA\")\n"
        "NUM_PAIRS = int(os.environ.get(\"STN_DIFFUSERS_NUM_PAIRS\", \"16\"))\n"
        "OUTPUT = \"analysis-report\""
    ),
    new_code_cell(
        "from stn_diffusers.analysis import analyze, format_markdown\n"
        "from stn_diffusers.cli import load_pipeline\n"
        "from stn_diffusers.data import load_photo_folder\n\n"
        "pipe = load_pipeline(PIPELINE)\n"
        "sources, names = None, None  # the bundled photos\n"
        "if DATA:\n"
        "    sources, paths = load_photo_folder(DATA)\n"
        "    names = [path.name for path in paths]\n"
        "report = analyze(pipe, OUTPUT, sources, names, num_pairs=NUM_PAIRS, num_visual=2, pipeline_dir=PIPELINE)"
    ),
    new_code_cell(
        "architecture, identity = report['architecture'], report['identity']\n"
        "print('parameters:', architecture['total_parameters'])\n"
        "shapes = architecture['activation_shapes']\n"
        "print('localisation activations:', ' → '.join('×'.join(map(str, s)) for s in shapes))\n"
        "print(f\"identity rate {identity['identity_rate']:.0%}, \"\n"
        "      f\"latent difference {identity['latent_difference']:.2e}\")\n"
        "print('modules with gradient:', report['gradient_flow']['modules_with_gradient'])\n"
        "print(f\"θ mean absolute error {report['theta']['mae']:.4f}, median corner error \"\n"
        "      f\"{report['theta']['corner_error']['median']:.2f} px\")"
    ),
    new_markdown_cell("The full report (what `report.md` holds), then its figures."),
    new_code_cell("display(Markdown(format_markdown(report).split('## Gradient flow')[0]))"),
    new_code_cell(
        "for name in report['figures'].values():\n"
        "    display(Image(filename=os.path.join(OUTPUT, name)))"
    ),
]

FINETUNE = [
    new_markdown_cell(
        "# Fine-tune a spatial transformer\n\n"
        "A few fine-tuning steps through the same code path as `python -m stn_diffusers.finetune`, then the training "
        "curves from the `metrics.jsonl` it writes. Set the variables below for a real run (a Stable Diffusion VAE, "
        "a folder of photos, thousands of steps)."
    ),
    new_code_cell(
        "import os\n\n"
        "from IPython.display import Image, display\n\n"
        "VAE = os.environ.get(\"STN_DIFFUSERS_VAE\", \"stabilityai/sd-vae-ft-mse\")  # hub id or local folder\n"
        "DATA = os.environ.get(\"STN_DIFFUSERS_DATA\", \"photos/train\")\n"
        "STN_CONFIG = os.environ.get(\"STN_DIFFUSERS_STN_CONFIG\", \"registration\")  # or `seed`, or a config.json\n"
        "RESOLUTION = os.environ.get(\"STN_DIFFUSERS_RESOLUTION\", \"512\")\n"
        "STEPS = os.environ.get(\"STN_DIFFUSERS_STEPS\", \"200\")\n"
        "OUTPUT = \"finetune-run\""
    ),
    new_code_cell(
        "from stn_diffusers.finetune import main, parse_args\n\n"
        "argv = [\n"
        "    \"--pretrained_vae_name_or_path\", VAE, \"--train_data_dir\", DATA, \"--stn_config\", STN_CONFIG,\n"
        "    \"--resolution\", RESOLUTION, \"--max_train_steps\", STEPS, \"--train_batch_size\", \"4\",\n"
        "    \"--pairs_per_image\", \"2\", \"--lr_warmup_steps\", \"1\", \"--validation_steps\", \"2\",\n"
        "    \"--num_validation_pairs\", \"4\", \"--logging_steps\", \"1\", \"--report_to\", \"none\",\n"
        "    \"--output_dir\", OUTPUT,\n"
        "]\n"
        "pipeline_dir = main(parse_args(argv))\n"
        "print('saved pipeline:', pipeline_dir)"
    ),
    new_code_cell(
        "from stn_diffusers.analysis import METRICS_FILE, plot_training_curves, read_metrics\n\n"
        "records = read_metrics(os.path.join(pipeline_dir, METRICS_FILE))\n"
        "figure, last = plot_training_curves(records, os.path.join(OUTPUT, \"training_curves.png\"))\n"
        "print('last values:', {name: round(value, 3) for name, value in last.items()})\n"
        "display(Image(filename=str(figure)))"
    ),
    new_markdown_cell(
        "The fine-tuned folder loads like any pipeline: "
        "`stn-diffusers analyze --pipeline finetune-run --output report` "
        "(or the `02_analyze_stn` notebook with `STN_DIFFUSERS_PIPELINE=finetune-run`) adds these curves to its "
        "report."
    ),
]


def build(cells: list) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=cells)
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index:02d}"  # stable ids: regenerating gives the same file
    notebook.metadata["kernelspec"] = KERNELSPEC
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_analyze_stn.ipynb": ANALYZE,
    "03_finetune.ipynb": FINETUNE,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = build(cells)
        nbformat.validate(notebook)
        nbformat.write(notebook, NOTEBOOKS_DIR / name)
        print(f"wrote {NOTEBOOKS_DIR / name}")


if __name__ == "__main__":
    main()
