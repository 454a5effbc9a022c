"""The Chameleon VQGAN (lumina.vqgan): Meta's layout and shapes, safe loading, the tiny fitted pair."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from lumina.tiny import demo_photo_crops, fit_photo_vqgan, tiny_vq_config
from lumina.vqgan import (
    VQGAN,
    CheckpointError,
    VQGANConfig,
    codes_to_pixels,
    load_state_dict_file,
    load_vqgan,
    save_vqgan,
)

# ckpts/chameleon/tokenizer/vqgan.yaml as Meta ships it (the values transformers' converter reads)
REAL_VQGAN_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_conditional: false, disc_in_channels: 3, disc_start: 0, disc_weight: 0.8}
"""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def tiny_vqgan():
    return fit_photo_vqgan(tiny_vq_config(512))


def test_real_yaml_matches_transformers_defaults(tmp_path):
    from transformers import ChameleonVQVAEConfig

    path = tmp_path / "vqgan.yaml"
    path.write_text(REAL_VQGAN_YAML)
    cfg = VQGANConfig.from_yaml(str(path))
    assert cfg == VQGANConfig()  # the defaults are the real tokenizer's
    assert cfg == VQGANConfig.from_transformers(ChameleonVQVAEConfig())
    assert (cfg.n_embed, cfg.embed_dim, cfg.ch_mult) == (8192, 256, (1, 1, 2, 2, 4))


def test_real_shapes_share_transformers_key_names():
    """Meta's keys for the encoder side are transformers' vqmodel keys, shape for shape."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    with torch.device("meta"):
        ours = VQGAN(VQGANConfig()).state_dict()
        theirs = ChameleonVQVAE(ChameleonVQVAEConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in ours.items() if k in theirs
    }
    decoder_side = sorted({k.split(".")[0] for k in ours if k not in theirs})
    assert decoder_side == ["decoder"]  # post_quant_conv is in transformers' vqmodel too
    assert "decoder.up.4.block.2.conv2.weight" in ours and "decoder.mid.attn_1.q.weight" in ours
    assert tuple(ours["decoder.conv_out.weight"].shape) == (3, 128, 3, 3)


@pytest.mark.slow
def test_real_shapes_checkpoint_loads_and_decodes(tmp_path):
    """A random checkpoint of the 7B tokenizer's shapes, in Meta's file layout (with the
    training loss's keys in it), loads and decodes a 2 x 3 grid like the model it was saved from."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig()).eval()
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(2)  # ignored, as in Meta's file
    torch.save({"state_dict": state, "global_step": 190000}, tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(REAL_VQGAN_YAML)
    loaded = load_vqgan(str(tmp_path / "vqgan.yaml"), str(tmp_path / "vqgan.ckpt"), with_encoder=False)
    codes = torch.tensor([[[0, 8191, 17], [4096, 5, 77]]])
    with torch.inference_mode():
        assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert codes_to_pixels(loaded, codes[0].numpy()).shape == (32, 48, 3)


def test_encoder_codes_equal_transformers(tiny_vqgan):
    """Our encoder and transformers' ChameleonVQVAE give the same codes from the same weights."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(1)
    ours = VQGAN(VQGANConfig.from_transformers(tiny_vq_config(512))).eval()
    theirs = ChameleonVQVAE(ChameleonVQVAEConfig(**ours.config.to_transformers())).eval()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")})
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        expected = theirs.encode(pixels).image_tokens.view(2, 4, 6)
        assert torch.equal(ours.encode(pixels), expected)


def test_unsafe_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": torch.zeros(2, 2)}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(str(path))
    assert not marker.exists()
    message = str(e.value)
    assert "\n" not in message and "refused" in message and "safetensors" in message
    (tmp_path / "vqgan.yaml").write_text(REAL_VQGAN_YAML)
    with pytest.raises(CheckpointError):  # through the loader too
        load_vqgan(str(tmp_path / "vqgan.yaml"), str(path))
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    with open(path, "rb"):
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError):
        load_state_dict_file(str(path))
    assert not marker.exists()


def test_safetensors_and_ckpt_round_trip(tmp_path, tiny_vqgan):
    codes = np.array([[1, 2, 3], [40, 50, 60]])
    expected = codes_to_pixels(tiny_vqgan, codes)
    for fmt, name in (("ckpt", "vqgan.ckpt"), ("safetensors", "vqgan.safetensors")):
        folder = save_vqgan(tiny_vqgan, str(tmp_path / fmt), fmt=fmt)
        loaded = load_vqgan(
            os.path.join(folder, "vqgan.yaml"), os.path.join(folder, name), with_encoder=False
        )
        assert np.array_equal(codes_to_pixels(loaded, codes), expected)
    doc = yaml.safe_load((tmp_path / "ckpt" / "vqgan.yaml").read_text())
    assert doc["model"]["params"]["n_embed"] == 512 and doc["model"]["params"]["ddconfig"]["ch"] == 64


def test_mismatched_checkpoint_names_the_keys(tmp_path, tiny_vqgan):
    folder = save_vqgan(tiny_vqgan, str(tmp_path / "vq"))
    state = load_state_dict_file(os.path.join(folder, "vqgan.ckpt"))
    del state["decoder.conv_out.bias"]
    state["quantize.embedding.weight"] = torch.zeros(10, 8)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(
        CheckpointError, match=r"missing decoder.conv_out.bias.*quantize.embedding.weight \(10, 8\)"
    ):
        load_vqgan(os.path.join(folder, "vqgan.yaml"), str(tmp_path / "bad.ckpt"))
    (tmp_path / "broken.yaml").write_text("model: {params: {n_embed: 4}}")
    with pytest.raises(CheckpointError, match="ddconfig"):
        VQGANConfig.from_yaml(str(tmp_path / "broken.yaml"))


def test_tiny_fit_is_deterministic(tiny_vqgan):
    again = fit_photo_vqgan(tiny_vq_config(512)).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in tiny_vqgan.state_dict().items())
    palette = tiny_vqgan.quantize.embedding.weight
    assert len({tuple(row.tolist()) for row in palette}) > 500  # k-means used the codebook


def test_tiny_pair_round_trip_on_small_photos(tiny_vqgan):
    """Encode -> decode of the bundled photos at a small size: the photos' own colours come back
    (the full-size figure, through the pre-tokenizer, is test_render's slow test)."""
    from PIL import Image

    crops = [np.asarray(Image.fromarray(c).resize((96, 64), Image.BOX)) for c in demo_photo_crops()]
    scores = []
    for crop in crops:
        pixels = torch.from_numpy(crop / 255.0 * 2 - 1).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            codes = tiny_vqgan.encode(pixels)[0].numpy()
        out = codes_to_pixels(tiny_vqgan, codes)
        assert out.shape == crop.shape
        scores.append(psnr(out, crop))
    assert np.mean(scores) > 17.0, scores  # measured 18.1 (a 4 x 6 mosaic of 96 x 64 pictures)
    assert min(scores) > 11.5, scores  # measured 12.6 (the astronaut)
