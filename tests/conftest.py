"""Shared fixtures: real photos from scikit-image's bundled data and tiny models built locally."""

from __future__ import annotations

import os

# Nothing in the test suite may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from diffusers import AutoencoderKL

from stn_diffusers import STN_PRESETS, SpatialTransformer, STNAlignmentPipeline

torch.set_num_threads(min(2, torch.get_num_threads()))

# The correlation design, small enough for tests that run in seconds (most tests of the learned
# cascade's mechanics use it: gates, confidences, weights).
TINY_REGISTRATION = {**STN_PRESETS["correlation"], "feature_channels": (8, 16, 16, 16), "feature_dim": 16}
# The search-refine design (the `registration` preset), with a narrower feature net.
TINY_SEARCH_REFINE = {**STN_PRESETS["registration"], "feature_channels": (8,)}


@pytest.fixture(scope="session")
def astronaut() -> PIL.Image.Image:
    """A 512×512 RGB photo."""
    return PIL.Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="session")
def coffee() -> PIL.Image.Image:
    """A 600×400 RGB photo (non-square)."""
    return PIL.Image.fromarray(skimage.data.coffee())


@pytest.fixture(scope="session")
def photo_tensor(astronaut) -> torch.Tensor:
    """The astronaut as (1, 3, 512, 512) float in [0, 1]."""
    return torch.from_numpy(np.array(astronaut)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def make_tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    """An AutoencoderKL with the Stable Diffusion latent layout (8×, 4 channels), randomly initialised;
    ``config`` replaces entries (e.g. ``latent_channels=16, shift_factor=0.1`` for SD3/FLUX's layout)."""
    torch.manual_seed(seed)
    defaults = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    return AutoencoderKL(**{**defaults, **config}).eval()


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    return make_tiny_vae()


@pytest.fixture
def seed_pipeline(tiny_vae) -> STNAlignmentPipeline:
    return STNAlignmentPipeline(vae=tiny_vae, stn=SpatialTransformer())


@pytest.fixture
def registration_pipeline(tiny_vae) -> STNAlignmentPipeline:
    torch.manual_seed(0)
    return STNAlignmentPipeline(vae=tiny_vae, stn=SpatialTransformer(**TINY_REGISTRATION))
