"""Image tokens back to pictures: lumina.render's renderer contract, load_renderer, `lumina render`,
and the tiny encode -> decode round trip through the pre-tokenizer's own path."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lumina.render import ChameleonRenderer, code_index, load_renderer, read_vocabulary
from lumina.tiny import demo_photo_crops, fit_photo_vqgan, image_code_token, tiny_vq_config, write_tiny_vq
from lumina.vq_encoder import ImageVocab, image_block
from lumina.vqgan import codes_to_pixels

from lumina_fixtures import build_tiny_dirs


@pytest.fixture(scope="session")
def tiny_dirs():
    """(tokenizer_dir, model_dir) of the tiny artifacts, built once per test process."""
    return build_tiny_dirs()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs[0])


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory, tiny_dirs):
    """The fitted tiny VQGAN in Meta's tokenizer-folder layout, with the tiny vocabulary."""
    model = fit_photo_vqgan(tiny_vq_config(512))
    return write_tiny_vq(str(tmp_path_factory.mktemp("vq")), model, tiny_dirs[0])


@pytest.fixture(scope="module")
def renderer(vq_dir):
    return load_renderer(vq_dir, device="cpu")


def _sample(tokenizer, grids, seed=0):
    """Token ids ``text <block> text <block> ...`` and their meta.images (as the pre-tokenizer writes)."""
    vocab = ImageVocab.from_tokenizer(tokenizer)
    rng = np.random.RandomState(seed)
    ids = list(tokenizer.encode("Generate a picture:", add_special_tokens=True))
    images, all_codes = [], []
    for rows, cols in grids:
        codes = rng.randint(0, 512, size=(rows, cols))
        block = image_block(vocab.code_ids[codes], vocab)
        images.append(
            {
                "offset": len(ids),
                "num_tokens": len(block),
                "h": rows * 16,
                "w": cols * 16,
                "grid": [rows, cols],
                "crop": [0, 0, cols * 16, rows * 16],
                "orig_size": [500, 300],
            }
        )
        ids += block.tolist() + tokenizer.encode(" and", add_special_tokens=False)
        all_codes.append(codes)
    return np.array(ids, dtype=np.uint16), images, all_codes


def test_code_names_match_transformers_mapping(tokenizer):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    vocab = tokenizer.get_vocab()
    mapping = ChameleonImageVocabularyMapping(vocab).bpe2img
    assert {vocab[n]: code_index(n) for n in vocab if code_index(n) is not None} == mapping
    assert code_index(image_code_token(8191)) == 8191 and code_index("IMGIMGZ") is None
    assert code_index("IMGIMGAKZ") is None and code_index("<reserved08799>") is None


def test_render_finds_the_codes_of_each_block(renderer, tokenizer):
    ids, images, codes = _sample(tokenizer, [(3, 5), (2, 2)])
    for block, expected in zip(images, codes):
        assert np.array_equal(renderer.codes(ids, block), expected)
        png = renderer.render(ids, block)
        assert png.startswith(b"\x89PNG")
        picture = np.asarray(Image.open(io.BytesIO(png)))
        assert picture.shape == (block["h"], block["w"], 3)
        assert np.array_equal(picture, codes_to_pixels(renderer.model, expected))


def test_render_resizes_to_the_block_size_and_reads_grid_from_h_w(renderer, tokenizer):
    ids, (block,), _ = _sample(tokenizer, [(2, 4)])
    image = renderer.render_image(ids, dict(block, w=100, h=50))
    assert image.size == (100, 50)
    no_grid = {k: v for k, v in block.items() if k != "grid"}
    assert renderer.render_image(ids, no_grid).size == (64, 32)


def test_render_errors_name_the_block(renderer, tokenizer):
    ids, (block,), _ = _sample(tokenizer, [(2, 3)])
    with pytest.raises(ValueError, match=r"image block at token \d+: 6 image codes, its 3x3 grid needs 9"):
        renderer.render(ids, dict(block, grid=[3, 3]))
    with pytest.raises(ValueError, match="tokens in all"):
        renderer.render(ids, dict(block, offset=len(ids) - 2))
    with pytest.raises(ValueError, match="needs integer offset and num_tokens"):
        renderer.render(ids, {"grid": [2, 3]})
    with pytest.raises(ValueError, match="neither grid nor h/w"):
        renderer.render(ids, {"offset": block["offset"], "num_tokens": block["num_tokens"]})


def test_load_renderer_says_what_is_missing(tmp_path, vq_dir, tiny_dirs, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"no vqgan.yaml in it \(nor in vq or tokenizer/"):
        load_renderer(str(tmp_path))
    for name in os.listdir(vq_dir):
        if name != "vqgan.ckpt":
            os.symlink(os.path.join(vq_dir, name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="has vqgan.yaml but no vqgan.safetensors or vqgan.ckpt"):
        load_renderer(str(tmp_path))
    os.symlink(os.path.join(vq_dir, "vqgan.ckpt"), tmp_path / "vqgan.ckpt")
    os.remove(tmp_path / "text_tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        load_renderer(str(tmp_path))
    # a separate vocabulary: the tokenizer folder, or a transformers model folder's vocabulary_map
    assert load_renderer(str(tmp_path), vocab=tiny_dirs[0], device="cpu").code_of_id.max() == 511
    assert read_vocabulary(tiny_dirs[1]) == read_vocabulary(tiny_dirs[0]) == tokenizer.get_vocab()
    # a make-tiny output root: its vq/ subfolder is found
    os.makedirs(tmp_path / "root")
    os.symlink(vq_dir, tmp_path / "root" / "vq")
    assert isinstance(load_renderer(str(tmp_path / "root"), device="cpu"), ChameleonRenderer)


def test_vocabulary_and_codebook_must_agree(vq_dir):
    from lumina.vqgan import load_vqgan

    model = load_vqgan(
        os.path.join(vq_dir, "vqgan.yaml"), os.path.join(vq_dir, "vqgan.ckpt"), with_encoder=False
    )
    with pytest.raises(ValueError, match="names code 600, the VQGAN codebook has 512"):
        ChameleonRenderer(model, {image_code_token(600): 7})
    with pytest.raises(ValueError, match="no IMGIMG"):
        ChameleonRenderer(model, {"<s>": 0})


def _write_shard(out_dir, tokenizer, samples):
    from wds_tools.writer import ShardWriter

    with ShardWriter(str(out_dir), vocab_size=len(tokenizer)) as writer:
        for key, (ids, images) in samples.items():
            writer.write(key, ids.tolist(), labels=ids.tolist(), meta={"images": images})
    return str(out_dir / "shard-r00000-000000.tar")


def test_render_command_writes_pngs(tmp_path, vq_dir, tokenizer, capsys):
    from lumina.cli import main

    ids, images, codes = _sample(tokenizer, [(2, 3), (4, 2)])
    text_only = np.array(tokenizer.encode("just text"), dtype=np.uint16)
    shard = _write_shard(tmp_path / "ds", tokenizer, {"a": (ids, images), "b": (text_only, [])})
    out = tmp_path / "png"
    assert main(["render", shard, "--key", "a", "--out", str(out), "--vq", vq_dir, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "a-img0.png"), str(out / "a-img1.png")]
    for path, block, expected in zip(printed, images, codes):
        picture = np.asarray(Image.open(path))
        assert picture.shape == (block["h"], block["w"], 3)
        assert np.array_equal(picture, codes_to_pixels(load_renderer(vq_dir, device="cpu").model, expected))
    assert main(["render", shard, "--key", "zzz", "--out", str(out), "--vq", vq_dir]) == 2
    assert "no sample with key 'zzz'" in capsys.readouterr().err
    assert main(["render", shard, "--key", "b", "--out", str(out), "--vq", vq_dir]) == 1
    assert "has no image blocks" in capsys.readouterr().err
    assert main(["render", shard, "--key", "a", "--out", str(out), "--vq", str(tmp_path)]) == 2
    assert "--vq: " in capsys.readouterr().err


def test_render_command_help():
    from lumina.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["render"].format_help()
    assert "--key" in help_text and "--vq" in help_text and "SOURCE" in help_text


@pytest.mark.slow
def test_make_tiny_round_trip_through_the_pre_tokenizer(tmp_path):
    """make-tiny's model encodes the bundled photos through the pre-tokenizer's encoder (the
    transformers vqmodel) and make-tiny's vq/ decodes them back: the PSNR docs/inspect.md states."""
    from transformers import AutoTokenizer

    from lumina.cli import main
    from lumina.vq_encoder import VQEncoder

    assert main(["make-tiny", "--out", str(tmp_path)]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    encoder = VQEncoder.from_pretrained(str(tmp_path / "model"), tok)
    renderer = load_renderer(str(tmp_path), device="cpu")
    scores = []
    for crop in demo_photo_crops():
        block_ids = encoder.encode_blocks([crop])[0]
        rows, cols = crop.shape[0] // 16, crop.shape[1] // 16
        block = {
            "offset": 0,
            "num_tokens": len(block_ids),
            "grid": [rows, cols],
            "h": crop.shape[0],
            "w": crop.shape[1],
        }
        picture = np.asarray(Image.open(io.BytesIO(renderer.render(block_ids, block))))
        scores.append(psnr(picture, crop))
    assert np.mean(scores) > 19.0, scores  # measured 19.68 (per photo 14.9 .. 23.6)
    assert min(scores) > 14.0, scores
    # the transformers encoder gives the codes of the fitted pair's own (Meta-layout) encoder
    crop = demo_photo_crops()[0]
    with torch.inference_mode():
        x = torch.from_numpy(crop / 255.0 * 2 - 1).permute(2, 0, 1)[None].float()
        own_codes = fit_photo_vqgan(tiny_vq_config(512)).encode(x)
    assert encoder.encode_codes([crop]).tolist() == own_codes.tolist()


def test_render_command_reads_a_manifest_over_http(tmp_path, vq_dir, tokenizer, capsys):
    """SOURCE may be a remote manifest: the sample comes by byte ranges through the reader."""
    from lumina.cli import main
    from wds_tools.merge import merge

    from servers import ScriptedHTTPServer

    ids, images, codes = _sample(tokenizer, [(3, 2)], seed=5)
    _write_shard(tmp_path / "ds", tokenizer, {"k1": (ids, images)})
    merge(str(tmp_path / "ds"))
    out = tmp_path / "png"
    with ScriptedHTTPServer(str(tmp_path / "ds")) as srv:
        argv = ["render", f"{srv.url}/index.json", "--key", "k1", "--out", str(out), "--vq", vq_dir]
        assert main([*argv, "--device", "cpu"]) == 0
        assert any(r[2] for r in srv.requests if r[0] == "GET")  # a ranged read, not the whole shard
    assert capsys.readouterr().out.split() == [str(out / "k1-img0.png")]
    picture = np.asarray(Image.open(out / "k1-img0.png"))
    assert np.array_equal(picture, codes_to_pixels(load_renderer(vq_dir, device="cpu").model, codes[0]))
