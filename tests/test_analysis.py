"""Modality analysis: NMI, k-means, modality gap, attention-map PNGs."""
import pytest
import torch
from PIL import Image

from msclip.analysis.attention_maps import patch_grid, save_image_attention, save_text_attention
from msclip.analysis.modality import (kmeans, layerwise_nmi, modality_gap, modality_nmi,
                                      normalized_mutual_info)


def test_nmi_hand_values_and_sklearn():
    a = torch.tensor([0, 0, 1, 1])
    assert normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert normalized_mutual_info(a, 1 - a) == pytest.approx(1.0)  # label names do not matter
    assert normalized_mutual_info(a, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 3, (500,), generator=g), torch.randint(0, 2, (500,), generator=g)
    y[:200] = x[:200] % 2
    assert normalized_mutual_info(x, y) == pytest.approx(sk.normalized_mutual_info_score(x, y), abs=1e-10)


def test_nmi_separated_vs_identical_modalities():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(200, 32, generator=g) + 4.0 * torch.eye(32)[0]  # image centroid far from text's
    txt = torch.randn(200, 32, generator=g) - 4.0 * torch.eye(32)[0]
    assert modality_nmi(img, txt) == pytest.approx(1.0)
    same_img, same_txt = torch.randn(200, 32, generator=g), torch.randn(200, 32, generator=g)
    assert modality_nmi(same_img, same_txt) < 0.05


def test_kmeans_recovers_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50, 4, generator=g) + 5, torch.randn(70, 4, generator=g) - 5])
    lab = kmeans(x, 2, seed=3)
    assert normalized_mutual_info(lab, torch.tensor([0] * 50 + [1] * 70)) == 1.0
    assert torch.equal(lab, kmeans(x, 2, seed=3))


def test_modality_gap():
    e = torch.eye(4)
    assert modality_gap(e[:1].repeat(5, 1), 3 * e[:1].repeat(7, 1)) == pytest.approx(0.0)  # norm ignored
    assert modality_gap(e[:1], e[1:2]) == pytest.approx(2 ** 0.5)


def test_layerwise_nmi_pairs_layers_by_trunk_index():
    g = torch.Generator().manual_seed(0)
    img = [torch.randn(40, 8, generator=g) + 5 for _ in range(2)]
    txt = [torch.randn(40, 8, generator=g) - 5 for _ in range(3)]
    rows = layerwise_nmi(img, txt, image_layers=[1, 2], text_layers=[0, 1, 2])  # image skips layer 0
    assert [r["layer"] for r in rows] == [1, 2]
    assert all(r["nmi"] == pytest.approx(1.0) for r in rows)


def test_attention_pngs(tmp_path):
    grid = patch_grid(1 + 16)
    assert grid == (4, 4) and patch_grid(1 + 12, (96, 128), 32) == (3, 4)
    attn = torch.softmax(torch.randn(2, 17, 17), dim=-1)
    p = save_image_attention(attn, tmp_path / "img.png", heads=[1], image=torch.rand(64, 64, 3).numpy())
    t = save_text_attention(torch.softmax(torch.randn(2, 6, 6), -1), ["<s>", "a", "cat", "</s>"],
                            tmp_path / "txt.png")
    for path in (p, t):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 50
    assert sorted(x.name for x in tmp_path.iterdir()) == ["img.png", "txt.png"]  # no temp files left
