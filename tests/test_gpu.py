"""GPU checks (skipped without CUDA): the chunked loss on the device agrees with the CPU."""

import pytest
import torch

from lumina.loss import chunked_lm_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_chunked_loss_on_cuda_matches_cpu(dtype, tol):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 128, generator=g)
    weight = torch.randn(1000, 128, generator=g) * 0.05
    labels = torch.randint(0, 1000, (2, 64), generator=g)
    labels[:, :20] = -100
    ref = chunked_lm_loss(hidden.double(), weight.double(), labels, chunk_size=16)
    h = hidden.to("cuda", dtype).requires_grad_()
    w = weight.to("cuda", dtype).requires_grad_()
    out = chunked_lm_loss(h, w, labels.cuda(), chunk_size=16)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < tol * max(1.0, abs(ref.loss.item()))
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
