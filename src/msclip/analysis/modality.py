"""How mixed are the two modalities inside a model? (the MS-CLIP paper's analysis, for any checkpoint)

* `modality_gap`: distance between the centroids of the L2-normalised image and text embeddings
  (Liang et al., "Mind the Gap"); 0 when both modalities occupy the same region of the sphere.
* `layerwise_nmi`: per trunk layer, 2-way k-means on the pooled hidden states of images and captions,
  then normalised mutual information between the clusters and the modality labels. 1 = the clustering
  recovers the modality exactly (separate subspaces); near 0 = the layer mixes the modalities.
  Pooled states are L2-normalised first by default, so a mere norm difference between modalities does
  not dominate the clustering.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, k: int = 2, n_init: int = 10, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; best of `n_init` runs by inertia. Returns labels [N]."""
    x = x.double()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans: {n} points cannot form {k} clusters")
    g = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        centers = x[torch.randint(n, (1,), generator=g)].clone()
        for _ in range(1, k):  # k-means++: next centre drawn proportionally to squared distance
            d2 = torch.cdist(x, centers).min(1).values.pow(2)
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            centers = torch.cat([centers, x[torch.multinomial(p.cpu(), 1, generator=g).to(x.device)]])
        labels = torch.zeros(n, dtype=torch.long, device=x.device)
        for it in range(iters):
            new = torch.cdist(x, centers).argmin(1)
            if it > 0 and torch.equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    centers[j] = members.mean(0)
        inertia = (x - centers[labels]).pow(2).sum().item()
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels.clone(), inertia
    return best_labels


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI with arithmetic-mean normalisation (scikit-learn's default): MI / ((H(a) + H(b)) / 2)."""
    a, b = a.long().view(-1).cpu(), b.long().view(-1).cpu()
    if a.numel() != b.numel():
        raise ValueError(f"NMI: {a.numel()} vs {b.numel()} labels")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(ai.max()) + 1, int(bi.max()) + 1, dtype=torch.float64)
    joint.index_put_((ai, bi), torch.ones_like(ai, dtype=torch.float64), accumulate=True)
    ha, hb = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    if ha == 0 or hb == 0:
        return 0.0
    pj = joint / joint.sum()
    outer = pj.sum(1, keepdim=True) * pj.sum(0, keepdim=True)
    nz = pj > 0
    mi = float((pj[nz] * (pj[nz] / outer[nz]).log()).sum())
    return max(0.0, mi / ((ha + hb) / 2))


def modality_nmi(image_feats: torch.Tensor, text_feats: torch.Tensor, normalize: bool = True,
                 n_init: int = 10, seed: int = 0) -> float:
    """NMI between a 2-way k-means clustering of both sets and the modality labels."""
    x = torch.cat([image_feats.float(), text_feats.float()])
    if normalize:
        x = F.normalize(x, dim=-1)
    labels = torch.cat([torch.zeros(len(image_feats)), torch.ones(len(text_feats))])
    return normalized_mutual_info(kmeans(x, 2, n_init=n_init, seed=seed), labels)


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """|| mean(normalise(image)) - mean(normalise(text)) ||_2."""
    ci = F.normalize(image_emb.double(), dim=-1).mean(0)
    ct = F.normalize(text_emb.double(), dim=-1).mean(0)
    return float((ci - ct).norm())


def layerwise_nmi(image_pooled: list[torch.Tensor], text_pooled: list[torch.Tensor],
                  image_layers: list[int], text_layers: list[int], normalize: bool = True,
                  seed: int = 0) -> list[dict]:
    """Per trunk layer that both modalities pass: NMI, modality gap of the pooled states, and whether the
    layer's widths match (layers of different widths cannot be compared and are skipped)."""
    text_at = dict(zip(text_layers, text_pooled))
    rows = []
    for layer, img in zip(image_layers, image_pooled):
        txt = text_at.get(layer)
        if txt is None or txt.shape[-1] != img.shape[-1]:
            continue
        rows.append({"layer": int(layer), "nmi": modality_nmi(img, txt, normalize, seed=seed),
                     "gap": modality_gap(img, txt)})
    return rows
