"""Fidelity: tokens and labels equal an independent computation of the reference semantics.

The ``ref_*`` functions below re-derive Lumina-mGPT's behaviour from its published code as
summarized in LUMINA_TOKENS.md (FlexARItemProcessor / MMConvItemProcessor / Conversation /
ChameleonImageProcessor), written without calling the code under test. Pixels are scaled as
Lumina-mGPT's own image tokenizer does (``x / 255 * 2 - 1``), the project's default. Image codes come from
running the tiny checkpoint's own ``get_image_tokens`` (vocabulary map included) on the
independently preprocessed pixels, in fp32, one image at a time as the reference does.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lumina.image_processing import crop_rng, crop_size_list
from lumina.item_processing import ItemFailure, ItemPreparer, ItemSettings, assemble
from lumina.vq_encoder import VQEncoder

from lumina_fixtures import build_tiny_dirs


@pytest.fixture(scope="session")
def tiny_dirs():
    """(tokenizer_dir, model_dir) of the tiny artifacts, built once per test process."""
    return build_tiny_dirs()


TARGET = 256

# ----------------------------------------------------------------------------------------------
# The reference, re-derived


def ref_crop_size_list(num_patches, patch_size, max_ratio=4.0):
    out, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def ref_var_crop(pil_image, sizes, rng):
    w, h = pil_image.size
    rem = [min(cw / w, ch / h) / max(cw / w, ch / h) for cw, ch in sizes]
    crop = sorted(zip(rem, sizes), reverse=True)[0][1]
    while pil_image.size[0] >= 2 * crop[0] and pil_image.size[1] >= 2 * crop[1]:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = max(crop[0] / pil_image.size[0], crop[1] / pil_image.size[1])
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    if rng is None:
        left, upper = (pil_image.size[0] - crop[0]) // 2, (pil_image.size[1] - crop[1]) // 2
    else:
        left = rng.randint(0, pil_image.size[0] - crop[0])
        upper = rng.randint(0, pil_image.size[1] - crop[1])
    return pil_image.crop((left, upper, left + crop[0], upper + crop[1]))


def ref_whiten(image):
    """Meta's ImageTokenizer._whiten_transparency (and the processor's blend_rgba)."""
    if image.mode != "RGB":
        rgba = np.array(image.convert("RGBA"))
        if not (rgba[:, :, 3] < 255).any():
            image = image.convert("RGB")
        else:
            alpha = rgba[:, :, 3] / 255.0
            rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * rgba[:, :, :3]
            image = Image.fromarray(rgb.astype("uint8"), "RGB")
    return image


def ref_pixels(image):
    """Lumina-mGPT's chameleon_vae_ori ImageTokenizer.img_tokens_from_pil: whiten, then
    ``np.array(img) / 255.0 * 2 - 1`` in float64, cast to the encoder weights' dtype (fp32)."""
    np_img = np.array(ref_whiten(image)) / 255.0
    np_img = np_img * 2 - 1
    return torch.from_numpy(np_img).permute(2, 0, 1).to(torch.float32)


def ref_transformers_pixels(image):
    """ChameleonImageProcessor(do_resize=False, do_center_crop=False): rescale 0.0078, normalize."""
    x = (np.array(ref_whiten(image)).astype(np.float64) * 0.0078).astype(np.float32)
    x = (x - np.array([1.0, 1.0, 1.0], dtype=np.float32)) / np.array([1.0, 1.0, 1.0], dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def ref_image_tokens(path, model, tok, rng):
    image = ref_var_crop(Image.open(path), ref_crop_size_list((TARGET // 32) ** 2, 32), rng)
    with torch.no_grad():
        toks = model.model.get_image_tokens(ref_pixels(image)[None])[0]
    grid = toks.reshape(image.size[1] // 16, image.size[0] // 16)
    new_line = tok.get_vocab()["<reserved08799>"]
    grid = torch.cat([grid, torch.full((grid.shape[0], 1), new_line, dtype=grid.dtype)], dim=1).flatten()
    vocab = tok.get_vocab()
    return [
        vocab["<racm3:break>"],
        vocab[f"<reserved{8800 + image.size[1] // 32:05d}>"],
        vocab[f"<reserved{8800 + image.size[0] // 32:05d}>"],
        *grid.tolist(),
        vocab["<eoss>"],
    ]


def ref_process_item(item, model, tok, crop="center", seed=0, index=0):
    conv = [dict(t) for t in item["conversations"]]
    images = item.get("image", [])
    images = images if isinstance(images, list) else [images]
    n_markers = "".join(t["value"] for t in conv).count("<|image|>")
    if n_markers == 0:
        conv[0]["value"] = "<|image|> " * len(images) + conv[0]["value"]
    else:
        assert n_markers == len(images)
    pieces = [(t["value"] + "<reserved08706>", i % 2 == 1) for i, t in enumerate(conv)]
    tokens = [tok.bos_token_id] + tok.encode("".join(p for p, _ in pieces), add_special_tokens=False)
    labels = [-100] * len(tokens)
    pos = 1
    for text, predict in pieces:  # byte-level BPE: each turn tokenized as is
        piece = tok.encode(text, add_special_tokens=False)
        assert tokens[pos : pos + len(piece)] == piece
        if predict:
            labels[pos : pos + len(piece)] = piece
        pos += len(piece)
    assert pos == len(tokens) and any(x != -100 for x in labels)
    placeholder = tok.get_vocab()["<|image|>"]
    out_t, out_l, k = [], [], 0
    for t, lab in zip(tokens, labels):
        if t != placeholder:
            out_t.append(t)
            out_l.append(lab)
            continue
        rng = crop_rng(seed, index, k) if crop == "random" else None  # our seeding of the reference's RNG
        block = ref_image_tokens(images[k], model, tok, rng)
        out_t += block
        out_l += block if lab > 0 else [-100] * len(block)
        k += 1
    return out_t, out_l


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tok_model(tiny_dirs):
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0])
    model = ChameleonForConditionalGeneration.from_pretrained(tiny_dirs[1], dtype=torch.float32).eval()
    return tok, model


def _smooth(h, w, seed, channels=3):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    planes = [
        127 + 120 * np.sin(xx / rs.uniform(5, 40) + yy / rs.uniform(5, 40) + rs.uniform(0, 6))
        for _ in range(channels)
    ]
    return (np.stack(planes, -1) + rs.randint(-6, 7, (h, w, channels))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidelity_images")
    paths = {}
    paths["rgb"] = d / "rgb.png"
    Image.fromarray(_smooth(200, 330, 1)).save(paths["rgb"])
    paths["tall"] = d / "tall.jpg"
    Image.fromarray(_smooth(420, 150, 2)).save(paths["tall"], quality=92)
    paths["big"] = d / "big.png"  # triggers BOX halving (>= 2x the crop on both sides)
    Image.fromarray(_smooth(700, 1100, 3)).save(paths["big"])
    rgba = _smooth(240, 240, 4, channels=4)
    rgba[..., 3] = np.linspace(0, 255, 240, dtype=np.uint8)[None, :]  # a transparency gradient
    paths["rgba"] = d / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    pal = Image.fromarray(_smooth(180, 260, 5)).convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 3
    paths["palette"] = d / "palette.png"
    pal.save(paths["palette"], transparency=3)
    paths["gray"] = d / "gray.png"
    Image.fromarray(_smooth(300, 260, 6, channels=1)[..., 0], "L").save(paths["gray"])
    paths["la"] = d / "la.png"
    la = _smooth(160, 320, 7, channels=2)
    Image.fromarray(la, "LA").save(paths["la"])
    return {k: str(v) for k, v in paths.items()}


def _conv(*turns):
    return [
        {"from": "human" if i % 2 == 0 else ("gpt" if i % 4 == 1 else "Assistant"), "value": v}
        for i, v in enumerate(turns)
    ]


def _run_ours(items, tiny_dirs, crop="center", seed=0, batch=True):
    """The code under test: prepare, encode (all same-size crops of all items batched), assemble."""
    prep = ItemPreparer(ItemSettings(tokenizer=tiny_dirs[0], target_size=TARGET, crop=crop, seed=seed))
    encoder = VQEncoder.from_pretrained(tiny_dirs[1], prep.tokenizer)
    prepared = [prep(i, it) for i, it in enumerate(items)]
    for p in prepared:
        assert not isinstance(p, ItemFailure), p
    crops = [(p.index, k, im) for p in prepared for k, im in enumerate(p.images)]
    blocks = {}
    for size in {im.size for _, _, im in crops}:
        group = [(i, k, im) for i, k, im in crops if im.size == size]
        if batch:
            out = encoder.encode_blocks([im.pixels for _, _, im in group])
        else:
            out = [encoder.encode_blocks([im.pixels])[0] for _, _, im in group]
        blocks.update({(i, k): b for (i, k, _), b in zip(group, out)})
    results = []
    for p in prepared:
        ids, labels, meta = assemble(
            p, [blocks[(p.index, k)] for k in range(len(p.images))], prep.text_ids.placeholder, "t.json"
        )
        results.append((ids.tolist(), labels.tolist(), meta))
    return results


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("target,expected", [(512, 49), (768, 73), (1024, 97)])
def test_crop_size_list_counts(target, expected):
    sizes = crop_size_list(target)
    assert len(sizes) == expected
    assert sizes == ref_crop_size_list((target // 32) ** 2, 32)
    assert all(w % 32 == 0 and h % 32 == 0 and max(w, h) / min(w, h) <= 4 for w, h in sizes)


def _cases(im):
    return {
        "text_only": {"conversations": _conv("Hello there!", "Hi. How can I help?")},
        "multi_turn_unicode": {
            "conversations": _conv(
                "Qu'est-ce que c'est ? café ☕",
                "Un café — “espresso” 🙂",
                "中文 한국어?",
                "是的。",
                "Ελληνικά",
            )
        },
        "human_image_explicit": {
            "conversations": _conv("Describe this: <|image|>\nPlease.", "A pattern of waves."),
            "image": im["rgb"],
        },
        "implicit_two_images": {
            "conversations": _conv("Compare them.", "The first is wider."),
            "image": [im["tall"], im["rgb"]],
        },
        "assistant_image": {
            "conversations": _conv(
                "Generate an image of 256x256 according to the following prompt:\nwaves", "<|image|>"
            ),
            "image": [im["big"]],
        },
        "both_turns": {
            "conversations": _conv(
                "Edit <|image|> to be brighter.", "Here: <|image|>", "Thanks", "You're welcome."
            ),
            "image": [im["gray"], im["tall"]],
        },
        "rgba_palette_la": {
            "conversations": _conv("<|image|><|image|>", "Two. And a third: <|image|>"),
            "image": [im["rgba"], im["palette"], im["la"]],
        },
        "empty_assistant": {"conversations": _conv("Say nothing.", "")},
    }


def test_tokens_and_labels_match_reference(tok_model, tiny_dirs, images):
    tok, model = tok_model
    cases = _cases(images)
    ours = _run_ours(list(cases.values()), tiny_dirs)
    for (name, item), (ids, labels, meta) in zip(cases.items(), ours):
        exp_ids, exp_labels = ref_process_item(item, model, tok)
        assert ids == exp_ids, name
        assert labels == exp_labels, name
        assert meta["index"] == list(cases).index(name)


def test_batch_one_equals_batched(tiny_dirs, images):
    items = list(_cases(images).values())
    assert _run_ours(items, tiny_dirs, batch=True) == _run_ours(items, tiny_dirs, batch=False)


def test_random_crop_is_seeded_and_matches_reference(tok_model, tiny_dirs, images):
    tok, model = tok_model
    item = {"conversations": _conv("<|image|> <|image|>", "ok"), "image": [images["big"], images["tall"]]}
    a = _run_ours([item], tiny_dirs, crop="random", seed=7)[0]
    b = _run_ours([item], tiny_dirs, crop="random", seed=7)[0]
    assert a == b
    exp_ids, exp_labels = ref_process_item(item, model, tok, crop="random", seed=7, index=0)
    assert a[0] == exp_ids and a[1] == exp_labels
    crops = [im["crop"] for im in a[2]["images"]]
    other = _run_ours([item], tiny_dirs, crop="random", seed=8)[0][2]["images"]
    assert crops != [im["crop"] for im in other]  # the seed matters (holds for these sizes)


def test_block_layout_and_meta(tok_model, tiny_dirs, images):
    tok, _ = tok_model
    vocab = tok.get_vocab()
    item = {"conversations": _conv("x", "<|image|>"), "image": images["rgb"], "id": "abc"}
    ids, labels, meta = _run_ours([item], tiny_dirs)[0]
    (im,) = meta["images"]
    assert meta["id"] == "abc" and meta["source"] == "t.json"
    h, w = im["h"], im["w"]
    assert im["grid"] == [h // 16, w // 16] and im["num_tokens"] == 4 + (h // 16) * (w // 16 + 1)
    block = ids[im["offset"] : im["offset"] + im["num_tokens"]]
    assert block[0] == vocab["<racm3:break>"] and block[-1] == vocab["<eoss>"]
    assert (
        block[1] == vocab[f"<reserved{8800 + h // 32:05d}>"]
        and block[2] == vocab[f"<reserved{8800 + w // 32:05d}>"]
    )
    rows = np.array(block[3:-1]).reshape(h // 16, w // 16 + 1)
    assert (rows[:, -1] == vocab["<reserved08799>"]).all()
    assert labels[im["offset"] : im["offset"] + im["num_tokens"]] == block  # assistant image: trained on
    assert im["orig_size"] == [330, 200] and im["crop"][2] - im["crop"][0] == w
    assert vocab["<|image|>"] not in ids


def test_block_lengths_at_reference_sizes():
    from lumina.vq_encoder import ImageVocab, image_block

    vocab = ImageVocab(image_start=1, image_end=2, row_end=3, code_ids=np.arange(10, 20), tokenizer=None)
    vocab._grid_ids.update({k: 100 + k for k in range(40)})
    for side, n in [(512, 1060), (768, 2356), (1024, 4164)]:
        assert len(image_block(np.zeros((side // 16, side // 16), dtype=np.int64), vocab)) == n


def test_unseeded_reference_rng_is_not_used():
    # crop_rng is independent of the global random state: reproducible across runs and ranks
    random.seed(1)
    a = crop_rng(0, 5, 1).randint(0, 1000)
    random.seed(2)
    assert crop_rng(0, 5, 1).randint(0, 1000) == a


# ----------------------------------------------------------------------------------------------
# Pixel scaling: Lumina-mGPT's x / 255 * 2 - 1 by default, transformers' x * 0.0078 - 1 on request

PHOTO = str(__import__("pathlib").Path(__file__).parents[1] / "lumina" / "assets" / "demo" / "astronaut.jpg")


def _photo_pixels():
    """A real photograph, cropped as the pre-tokenizer does (uint8, 256 x 256 x 3)."""
    from lumina.image_processing import prepare_image

    pixels = prepare_image(PHOTO, crop_size_list(TARGET), None).pixels
    assert pixels.min() == 0 and pixels.max() == 255  # black and white both occur
    return pixels


def _lut_pixels(lut, pixels):
    return lut[torch.from_numpy(pixels).long()].permute(2, 0, 1)


def test_lumina_pixel_scaling_is_exactly_minus_one_to_one():
    from lumina.vq_encoder import pixel_lut

    lut = pixel_lut(torch.float32)
    assert lut[0].item() == -1.0 and lut[255].item() == 1.0
    assert lut[51].item() == np.float32(51 / 255 * 2 - 1)
    pixels = _photo_pixels()
    assert torch.equal(_lut_pixels(lut, pixels), ref_pixels(Image.fromarray(pixels)))
    # bf16 (the GPU default): cast straight from float64, as the reference's .to(weight)
    lut16 = pixel_lut(torch.bfloat16)
    ref16 = torch.from_numpy(pixels / 255.0 * 2 - 1).permute(2, 0, 1).to(torch.bfloat16)
    assert torch.equal(_lut_pixels(lut16, pixels), ref16)


def test_transformers_pixel_scaling_matches_the_image_processor():
    try:  # transformers >= 5 names the PIL backend; older releases have only this one
        from transformers.models.chameleon.image_processing_pil_chameleon import (
            ChameleonImageProcessorPil as Processor,
        )
    except ImportError:
        from transformers import ChameleonImageProcessor as Processor

    from lumina.vq_encoder import pixel_lut

    lut = pixel_lut(torch.float32, scaling="transformers")
    assert lut[0].item() == -1.0
    assert lut[255].item() == np.float32(np.float32(255 * 0.0078) - 1) and abs(lut[255].item() - 0.989) < 1e-6
    pixels = _photo_pixels()
    proc = Processor(do_resize=False, do_center_crop=False)
    expected = proc(Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(_lut_pixels(lut, pixels), expected)
    assert torch.equal(_lut_pixels(lut, pixels), ref_transformers_pixels(Image.fromarray(pixels)))
    assert not torch.equal(expected, ref_pixels(Image.fromarray(pixels)))  # the two differ


@pytest.mark.parametrize("kwargs", [{"pixel_scaling": "transformers"}, {"rescale_factor": 0.0078}, {}])
def test_encoder_pixel_scaling_option(tok_model, tiny_dirs, kwargs):
    """The encoder's codes equal the model's on the chosen scaling's independent pixels."""
    tok, model = tok_model
    pixels = _photo_pixels()
    encoder = VQEncoder.from_pretrained(tiny_dirs[1], tok, **kwargs)
    ref = ref_pixels if not kwargs else ref_transformers_pixels
    with torch.no_grad():
        expected = model.model.vqmodel.encode(ref(Image.fromarray(pixels))[None]).image_tokens
    assert encoder.encode_codes([pixels]).reshape(-1).tolist() == expected.reshape(-1).tolist()
