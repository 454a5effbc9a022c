"""The chunked reference loss against an independent computation on full logits."""

import pytest
import torch

from lumina.loss import IGNORE_INDEX, chunked_lm_loss, supervised_positions
from lumina.model import LuminaChameleon, image_token_ids
from lumina.train_config import LossConfig

VOCAB = 96
NUM_IMAGE = 32  # ids 4..35 are image codes


def _config():
    from transformers import ChameleonConfig

    vocab_map = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": 36}
    for i in range(NUM_IMAGE):
        vocab_map["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"] = 4 + i
    for i in range(37, VOCAB):
        vocab_map[f"t{i}"] = i
    vq = dict(
        embed_dim=8,
        num_embeddings=NUM_IMAGE,
        latent_channels=32,
        resolution=64,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=0,
    )
    return ChameleonConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocabulary_map=vocab_map,
        vq_config=vq,
    )


def _independent_loss(logits, labels, z_weight):
    """Shift, keep supervised positions, cross-entropy mean + z_weight * mean(logsumexp^2)."""
    total_ce, total_z, count = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            lse = torch.log(torch.exp(row - row.max()).sum()) + row.max()
            total_ce = total_ce + (lse - row[target])
            total_z = total_z + lse * lse
            count += 1
    return total_ce / count + z_weight * total_z / count


def _batch(seed=0, batch=3, length=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # an unsupervised prompt
    labels[1, 12:] = IGNORE_INDEX  # right padding of sample 1
    labels[2, 3:9] = torch.arange(4, 10)  # image-code targets
    ids[2, 3:9] = torch.arange(4, 10)
    return ids, labels


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_matches_independent_formula(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64, requires_grad=True)
    _, labels = _batch()
    out = chunked_lm_loss(hidden, weight, labels, z_loss_weight=1e-2, chunk_size=chunk)
    expected = _independent_loss(hidden @ weight.T, labels, 1e-2)
    assert out.num_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    # Gradients through the checkpointed chunks equal those of the plain formula.
    g_h, g_w = torch.autograd.grad(out.loss, (hidden, weight))
    e_h, e_w = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(g_h, e_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, e_w, rtol=1e-4, atol=1e-6)


def test_no_supervised_tokens_gives_zero_loss_with_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(VOCAB, 8, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    out = chunked_lm_loss(hidden, weight, labels)
    assert out.num_tokens == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()  # still connected: every ZeRO-3 rank must produce the same gradients
    assert weight.grad is not None and float(weight.grad.abs().sum()) == 0.0


def test_precomputed_positions_equal_computed():
    _, labels = _batch()
    pos = supervised_positions(labels)
    hidden, weight = torch.randn(3, 17, 8), torch.randn(VOCAB, 8)
    a = chunked_lm_loss(hidden, weight, labels, chunk_size=4)
    b = chunked_lm_loss(hidden, weight, labels, chunk_size=4, positions=pos)
    torch.testing.assert_close(a.loss, b.loss)


def test_model_loss_on_chameleon_unmasks_image_tokens():
    from transformers import ChameleonForConditionalGeneration

    torch.manual_seed(0)
    config = _config()
    chameleon = ChameleonForConditionalGeneration(config).eval()
    model = LuminaChameleon(chameleon, LossConfig(z_loss_weight=1e-5, loss_chunk_size=7))
    ids, labels = _batch()
    out = model(ids, labels)
    # Independent: hidden states from the HF base model, lm_head applied by hand, no masking.
    hidden = chameleon.model(input_ids=ids).last_hidden_state
    logits = chameleon.lm_head(hidden)
    expected = _independent_loss(logits, labels, 1e-5)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.loss)
    # HF's forward masks image-token logits: image targets would have infinite/huge loss there.
    with torch.no_grad():
        hf_logits = chameleon(input_ids=ids).logits
    ids_img = image_token_ids(config)
    assert float(hf_logits[..., ids_img].max()) < -1e30
    torch.testing.assert_close(model.logits(ids)[..., 40:], hf_logits[..., 40:].float())


def test_mask_image_logits_option():
    from transformers import ChameleonForConditionalGeneration

    torch.manual_seed(0)
    chameleon = ChameleonForConditionalGeneration(_config()).eval()
    model = LuminaChameleon(chameleon, LossConfig(mask_image_logits=True))
    ids, labels = _batch()
    labels[2, 3:9] = IGNORE_INDEX  # text-only supervision
    out = model(ids, labels)
    logits = model.logits(ids)
    logits[..., image_token_ids(chameleon.config)] = float("-inf")
    expected = _independent_loss(logits, labels, 1e-5)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
