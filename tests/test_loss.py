"""ClipLoss: equality with a naive full-matrix cross-entropy; the exchange of both losses across 3 real gloo
processes (tests/dist_scripts/loss_exchange_check.py: ClipLoss's all-gather, SigLipLoss's ring)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from msclip.loss import ClipLoss, gather_features
from torchrun_utils import run_torchrun

TESTS = Path(__file__).resolve().parent


def naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Textbook definition: log-softmax over every row / column of the full matrix, one entry at a time."""
    logits = scale * img @ txt.T
    n = logits.shape[0]
    i2t = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    t2i = -torch.stack([logits[:, j].log_softmax(0)[j] for j in range(n)]).mean()
    return (i2t + t2i) / 2


def test_matches_naive_full_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 16, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(7, 16, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    ours = ClipLoss()(img, txt, scale)
    ref = naive_clip_loss(img, txt, scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    g_ours = torch.autograd.grad(ours, (img, txt, scale))
    g_ref = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_perfect_alignment_and_labels_cache() -> None:
    eye = torch.eye(4)
    loss = ClipLoss()
    # Matching pairs with a large scale: loss -> 0; swapped pairs: loss large.
    assert loss(eye, eye, torch.tensor(100.0)).item() < 1e-6
    assert loss(eye, eye.flip(0), torch.tensor(100.0)).item() > 10
    assert len(loss._labels) == 1  # cached per (device, size)


def test_single_process_gather_is_identity() -> None:
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    a, b = gather_features(x, y, local_loss=True, rank=0, world_size=1)
    assert a is x and b is y


WORLD = 3  # not 2: there both ring neighbours are one rank, so sending one way and receiving the other passes


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "loss.json"
    run_torchrun([str(TESTS / "dist_scripts" / "loss_exchange_check.py"), str(out)], nproc=WORLD, timeout=150)
    res = json.loads(out.read_text())
    assert res["world_size"] == WORLD
    return res


@pytest.mark.dist
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_across_ranks_matches_single_process(dist_results: dict, local_loss: bool) -> None:
    """Loss and grads of a 3-rank gloo run equal one process on the global batch (1e-5).

    Convention checked: mean of rank losses == L; each rank's feature grads == W * dL/dx[its slice];
    mean of rank logit_scale grads == dL/ds; a DDP-wrapped toy model gets exactly the single-process
    parameter grads (DDP's averaging cancels the factor W).
    """
    res = dist_results["clip"]
    for key in (f"local={local_loss}/grad=True", f"local={local_loss}/ddp"):
        for name, diff in res[key].items():
            assert diff < 1e-5, (key, name, diff)
    # Without grad through the gather the loss value is still exact, and each rank's features still get the
    # gradient of its own loss (the local slice keeps its graph); only the other ranks' share is lost.
    no_grad = res[f"local={local_loss}/grad=False"]
    assert set(no_grad) == {"loss", "scale_grad", "img_grad", "txt_grad"}
    for name, diff in no_grad.items():
        assert diff < 1e-5, (local_loss, name, diff)


@pytest.mark.dist
def test_siglip_ring_matches_full_batch(dist_results: dict) -> None:
    """SigLipLoss's ring over 3 ranks: mean of rank losses == L on the concatenated batch; each rank's feature
    grads == W * dL/dx of its slice; the bias's (already averaged) and the mean temperature grads == dL/db,
    dL/ds; DDP-wrapped toy towers + the loss's bias get exactly the single-process parameter grads (1e-5)."""
    res = dist_results["siglip"]
    for name, diff in res.items():
        assert diff < 1e-5, (name, diff)
    assert set(res) >= {"loss", "img_grad", "txt_grad", "scale_grad", "bias_grad", "ddp_param_grad"}
