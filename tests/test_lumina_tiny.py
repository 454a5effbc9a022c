"""The tiny offline tokenizer and Chameleon checkpoint load through the real from_pretrained path."""

import pytest
import torch

from lumina.tiny import SPECIAL_TOKENS, image_code_token

from lumina_fixtures import build_tiny_dirs


@pytest.fixture(scope="session")
def tiny_dirs():
    """(tokenizer_dir, model_dir) of the tiny artifacts, built once per test process."""
    return build_tiny_dirs()


def test_tokenizer_special_tokens_are_single_ids(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0])
    assert tok.bos_token == "<s>" and tok.bos_token_id is not None
    names = list(SPECIAL_TOKENS.values()) + ["<|image|>", "<reserved08800>", "<reserved08864>"]
    for name in names:
        ids = tok.encode(name, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(name), name
    text = "café 🙂 中文 — “x”"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_image_code_naming_matches_transformers():
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    vocab = {image_code_token(i): 100 + i for i in (0, 7, 10, 511, 8191)}
    mapping = ChameleonImageVocabularyMapping(vocab)
    assert mapping.bpe2img == {100 + i: i for i in (0, 7, 10, 511, 8191)}
    assert image_code_token(8191) == "IMGIMGIBJBZ"


def test_model_maps_codes_to_tokenizer_ids(tiny_dirs):
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0])
    model = ChameleonForConditionalGeneration.from_pretrained(tiny_dirs[1])
    assert model.config.vocab_size == len(tok)
    pixels = torch.rand(1, 3, 64, 96) * 2 - 1
    codes = model.model.vqmodel.encode(pixels).image_tokens
    assert codes.numel() == (64 // 16) * (96 // 16)
    ids = model.model.get_image_tokens(pixels)[0]
    expected = [tok.convert_tokens_to_ids(image_code_token(int(c))) for c in codes]
    assert ids.tolist() == expected
