"""Other VAEs than the default's, end to end on tiny local models: 16 channels with a `shift_factor` (the
SD3 and FLUX latent layout), and `AutoencoderTiny` (TAESD's architecture)."""

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, data, geometry, prepare_inpainting_inputs
from stn_diffusers.finetune import main as finetune_main
from stn_diffusers.finetune import parse_args
from tests.conftest import TINY_SEARCH_REFINE, make_tiny_vae

SIZE = 256
THETA = torch.tensor([[[1.02, 0.03, 0.05], [-0.03, 1.02, -0.04]]])


def tiny_vae16() -> AutoencoderKL:
    """An AutoencoderKL with SD3/FLUX's latent layout: 8× downsampling, 16 channels, a shift and a scale."""
    return make_tiny_vae(block_out_channels=(16, 32, 32, 32), latent_channels=16, scaling_factor=1.5, shift_factor=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> STNAlignmentPipeline:
    """A few fine-tuning steps of the registration preset on the 16-channel VAE, saved and reloaded."""
    root = tmp_path_factory.mktemp("vae16")
    photos = root / "photos"
    photos.mkdir()
    PIL.Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.jpg")
    PIL.Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
    tiny_vae16().save_pretrained(root / "vae")
    args = parse_args([
        "--pretrained_vae_name_or_path", str(root / "vae"), "--train_data_dir", str(photos),
        "--output_dir", str(root / "out"), "--resolution", str(SIZE), "--train_batch_size", "2",
        "--max_train_steps", "3", "--pairs_per_image", "2", "--validation_steps", "3", "--num_validation_pairs", "2",
        "--checkpointing_steps", "3", "--report_to", "none", "--seed", "0",
    ])  # fmt: skip
    finetune_main(args)
    return STNAlignmentPipeline.from_pretrained(root / "out", use_safetensors=True)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.from_numpy(skimage.data.astronaut().astype(np.float32) / 255).permute(2, 0, 1)
    reference, moving = data.make_pair(source, SIZE, THETA, torch.Generator().manual_seed(0))
    return reference, moving


def test_finetuned_stn_reads_16_channels(trained):
    assert trained.vae.config.latent_channels == 16 and trained.vae.config.shift_factor == pytest.approx(0.1)
    assert trained.stn.config.in_channels == 16 and trained.stn.config.architecture == "search_refine"
    assert trained.stn.localization.residual[2].weight.abs().sum() > 0  # the steps changed the features


def test_latents_carry_the_shift_and_scale(trained, pair):
    reference, _ = pair
    latents = trained.encode_images([reference], SIZE, SIZE)
    raw = trained.vae.encode(trained.image_processor.preprocess(reference[None], SIZE, SIZE)).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - 0.1) * 1.5, atol=1e-4, rtol=1e-4)
    assert latents.shape == (1, 16, SIZE // 8, SIZE // 8)


def test_align_with_ecc_reaches_the_truth(trained, pair):
    reference, moving = pair
    out = trained(moving, reference=reference, refine="ecc", output_type="pt", decode=False)
    assert out.theta.shape == (1, 2, 3) and torch.isfinite(out.theta).all()
    assert float(geometry.corner_error(out.theta, THETA, SIZE, SIZE)) < 0.5


def test_inpainting_preprocessing(trained, pair):
    reference, moving = pair
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 100:160, 80:170] = 1
    inputs = prepare_inpainting_inputs(trained, moving, mask, reference, align_kwargs={"refine": "ecc"})
    assert float(geometry.corner_error(inputs.theta, THETA, SIZE, SIZE)) < 0.5
    aligned_mask = np.asarray(inputs.mask_image[0], dtype=np.float32).squeeze()
    aligned_mask = aligned_mask / aligned_mask.max()
    assert aligned_mask.shape == (SIZE, SIZE) and aligned_mask[100:160, 80:170].mean() > 0.99
    assert aligned_mask.mean() < 0.2  # the repainted region and the exposed border, not the whole frame


def test_autoencoder_tiny_aligns_and_skips_the_decoder(pair):
    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    ).eval()  # fmt: skip
    pipe = STNAlignmentPipeline(vae=vae, stn=SpatialTransformer(**TINY_SEARCH_REFINE))
    reference, moving = pair
    latents = pipe(moving, reference=reference, output_type="latent")
    height, width = pipe.working_size((SIZE, SIZE))
    assert latents.latents.shape == (1, 4, height // 8, width // 8) and latents.images is None
    out = pipe(moving, reference=reference, refine="ecc", output_type="pt", decode=False)
    assert float(geometry.corner_error(out.theta, THETA, SIZE, SIZE)) < 0.5 and out.refined.tolist() == [True]
