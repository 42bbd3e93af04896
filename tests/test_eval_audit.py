"""Promises of the evaluation code that the other eval tests leave open (found by a mutation audit):
validation-only model selection, feature normalisation, tie handling, label order, error messages."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import msclip
from msclip.eval import suite as S
from msclip.eval.features import cached
from msclip.eval.imagefolder import DataError, resolve_classnames
from msclip.eval.in_training import ZeroShotEvaluator, folder_task
from msclip.eval.linear_probe import run_probe, search_hparam, train_linear_heads
from msclip.eval.loading import eval_transform
from msclip.eval.retrieval import AnnotationError, RetrievalSet, evaluate_retrieval, read_annotations, recall_at_k

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _separable(n: int = 200, d: int = 12, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


# ----------------------------------------------------------------------------- linear probe
@pytest.mark.parametrize("protocol,kw", [("clip", {"coarse": [-2.0, 0.0, 2.0], "refine_steps": 0}),
                                         ("sgd", {"epochs": 5, "batch_size": 64, "coarse": [-1.0, -3.0],
                                                  "refine_steps": 0})])
def test_probe_selects_on_validation_never_on_test(protocol, kw):
    # Test labels are all wrong on purpose: a search that peeks at the test split reports near-zero
    # "validation" scores, one that uses the validation split reports near-perfect ones.
    x, y = _separable(240)
    train, val, test = (x[:120], y[:120]), (x[120:180], y[120:180]), (x[180:], (y[180:] + 1) % 3)
    res = run_probe(train, test, "accuracy", val=val, protocol=protocol, **kw)
    assert res["val_score"] >= 0.95 and max(h["val"] for h in res["search"]) == res["val_score"]
    assert res["score"] <= 0.1  # the refit model is then scored on the (mislabelled) test split


def test_probe_features_are_l2_normalised():
    # With normalize=True (the default) a per-sample positive rescaling of the features changes nothing.
    x, y = _separable(150, seed=1)
    x = x + 2.0  # off-centre, so that the scale of a sample matters to an unnormalised linear model
    scale = 10.0 ** torch.linspace(-2, 2, len(x))[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    kw = {"coarse": [-2.0, 0.0, 2.0], "refine_steps": 0, "protocol": "clip"}
    a = run_probe((x[:100], y[:100]), (x[100:], y[100:]), "accuracy", **kw)
    b = run_probe((x[:100] * scale[:100, None], y[:100]), (x[100:] * scale[100:, None], y[100:]), "accuracy", **kw)
    assert a["hparam"] == b["hparam"]
    assert [h["val"] for h in a["search"]] == pytest.approx([h["val"] for h in b["search"]])
    assert a["score"] == pytest.approx(b["score"])


def test_search_ties_keep_the_earlier_coarse_value_and_the_current_best():
    coarse = [float(e) for e in range(-3, 4)]
    # two coarse values tie for best: the earlier one (the strongest regularisation for C / decay order) wins
    best, _ = search_hparam(lambda exps: [1.0 if e in (-1.0, 2.0) else 0.0 for e in exps], coarse, refine_steps=0)
    assert best == -1.0
    # a refinement point that only ties the current best does not replace it
    best, history = search_hparam(lambda exps: [1.0 if e in (0.0, 0.5) else 0.0 for e in exps], coarse,
                                  refine_steps=1)
    assert 0.5 in dict(history) and best == 0.0


def test_sgd_heads_apply_their_own_weight_decay():
    x, y = _separable(128, seed=2)
    w, _ = train_linear_heads(x, y, [30.0, 0.0], 3, epochs=20, batch_size=32)
    # decoupled decay 30 at lr <= 1e-2 holds |W| entries near lr / (lr * 30); without decay they keep growing
    assert w[0].norm() < 0.4 * w[1].norm()


# ----------------------------------------------------------------------------- feature cache
def test_damaged_cache_entry_is_recomputed(tmp_path):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"features": torch.ones(2, 3)}

    cached(tmp_path, "k", compute)
    entry = tmp_path / "features-k.pt"
    entry.write_bytes(b"truncated by a crash")
    result, hit = cached(tmp_path, "k", compute)
    assert not hit and len(calls) == 2 and torch.equal(result["features"], torch.ones(2, 3))
    assert cached(tmp_path, "k", compute)[1]  # the rewritten entry is readable again


# ----------------------------------------------------------------------------- retrieval
def test_recall_ties_count_against_the_query():
    # Two images with identical embeddings: each caption's own image ties with the other one.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    out = recall_at_k(img, txt, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert out["text_to_image_R@1"] == pytest.approx(1 / 3) and out["text_to_image_R@2"] == 1.0
    assert out["image_to_text_R@1"] == pytest.approx(1 / 3) and out["image_to_text_R@2"] == 1.0


class _ScaledImages(torch.nn.Module):
    """A model whose image features are rescaled by a large, per-image factor (direction unchanged)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.cfg, self.seen = model, model.cfg, 0

    def encode_image(self, x: torch.Tensor, **kw) -> torch.Tensor:
        f = self.model.encode_image(x, **kw)
        factor = 10.0 ** (3.0 - 6.0 * (torch.arange(self.seen, self.seen + len(f)) % 2))
        self.seen += len(f)
        return f * factor[:, None]

    def encode_text(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        return self.model.encode_text(tokens, **kw)


def _pairs(root: Path, corrupt_at: int | None = None) -> RetrievalSet:
    rows = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (20, 20), c).save(root / f"{c}.png")
        rows += [[f"{c}.png", f"a {c} square"], [f"{c}.png", f"something {c}"]]
        if i == corrupt_at:
            (root / "bad.png").write_bytes(b"not an image")
            rows += [["bad.png", "an unreadable picture"]]
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"]] + rows)
    return read_annotations(str(root / "pairs.csv"))


def _expected(model, data: RetrievalSet) -> dict[str, float]:
    """Recall@k by hand from unit-norm embeddings of the readable images and their captions."""
    tf, tok = eval_transform(model), msclip.get_tokenizer(model.cfg)
    ok = [i for i, p in enumerate(data.images) if not p.endswith("bad.png")]
    caps = [(c, ok.index(o)) for c, o in zip(data.captions, data.caption_image) if o in ok]
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(Image.open(data.images[i]).convert("RGB")) for i in ok]))
        txt = model.encode_text(tok([c for c, _ in caps]))
    return recall_at_k(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor([o for _, o in caps]))


def _check(result: dict, expected: dict[str, float]) -> None:
    # recall@k of so few images can coincide by chance; the mean ranks pin every query's rank down further
    for k, v in expected.items():
        got = result["metrics"][f"{k}_pct" if "R@" in k else k]
        assert got == pytest.approx(100.0 * v if "R@" in k else v, abs=1e-4), k


def test_retrieval_normalises_image_features(tmp_path):
    torch.manual_seed(0)
    model = msclip.create_model("clip-b32-tiny").eval()
    data = _pairs(tmp_path)
    result = evaluate_retrieval(_ScaledImages(model), data, torch.device("cpu"), batch_size=4, progress=False)
    _check(result, _expected(model, data))


def test_retrieval_drops_an_unreadable_image_in_the_middle(tmp_path):
    torch.manual_seed(0)
    model = msclip.create_model("clip-b32-tiny").eval()
    data = _pairs(tmp_path, corrupt_at=1)  # bad.png is image 2 of 7: later images must be renumbered
    result = evaluate_retrieval(model, data, torch.device("cpu"), batch_size=4, progress=False)
    assert (result["images"], result["captions"], result["skipped_images"], result["dropped_captions"]) == (6, 12, 1, 1)
    _check(result, _expected(model, data))


def test_annotation_errors_name_the_file_and_captionless_images_are_left_out(tmp_path):
    bad = tmp_path / "cols.csv"
    bad.write_text("picture,words\na.png,hello\n")
    with pytest.raises(AnnotationError, match="cols.csv.*caption columns"):
        read_annotations(str(bad))
    k = {"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": "a"}]},
                    {"filename": "b.png", "split": "test", "sentences": []},
                    {"filename": "c.png", "split": "test", "sentences": [{"raw": "c1"}, {"raw": "c2"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(k))
    rs = read_annotations(str(tmp_path / "k.json"), str(tmp_path))
    # an image without captions would count as a never-retrieved query in image->text recall
    assert [Path(p).name for p in rs.images] == ["a.png", "c.png"] and rs.caption_image == [0, 1, 1]


# ----------------------------------------------------------------------------- class names and folders
def test_class_name_files_follow_the_folder_order_and_refuse_blank_names(tmp_path):
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"b": "Bee", "z": "unused", "a": "Ant"}))  # not in folder order
    assert resolve_classnames(["a", "b"], str(mapping))[0] == ["Ant", "Bee"]
    lines = tmp_path / "names.txt"
    lines.write_text("dog\n\ncat\n")
    with pytest.raises(DataError, match=r"names.txt.*empty name on line\(s\) \[2\]"):
        resolve_classnames(["a", "b", "c"], str(lines))


def _colour_folder(root: Path, per_class: int = 2, names=COLOURS[:5]) -> None:
    for c in names:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), c).save(root / c / f"{i}.png")


def test_in_training_subset_spans_every_class(tmp_path):
    _colour_folder(tmp_path / "data")  # 5 classes x 2 images, stored class by class
    task = folder_task(str(tmp_path / "data"), lambda im: torch.zeros(1), num_samples=5)
    labels = [task.dataset[i][2] for i in range(len(task.dataset))]
    assert len(labels) == 5 and sorted(labels) == [0, 1, 2, 3, 4]


def test_in_training_evaluation_runs_in_eval_mode(tmp_path):
    # MS-CLIP-S has BatchNorm: scored in training mode it would use batch statistics and move its running ones.
    _colour_folder(tmp_path / "data", per_class=3, names=COLOURS[:3])
    torch.manual_seed(0)
    model, _, tf = msclip.create_model_and_transforms("msclip-s-b32-tiny")
    task = folder_task(str(tmp_path / "data"), tf, templates=["a {} photo."])
    ev = ZeroShotEvaluator(task, msclip.get_tokenizer(model.cfg), torch.device("cpu"), None, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = ev(model.eval())
    model.train()
    assert ev(model) == reference and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_suite_test_split_uses_the_training_label_order(tmp_path):
    # the test split lacks a class: its labels must still index the training split's classes
    _colour_folder(tmp_path / "train", names=["blue", "green", "red"])
    _colour_folder(tmp_path / "test", names=["red"])
    sp = S.load_splits(S.get_spec("colours"), tmp_path)
    assert sp["train"].classnames == ["blue", "green", "red"]
    assert [sp["test"][i][1] for i in range(len(sp["test"]))] == [2, 2]


def test_zeroshot_report_lists_every_skipped_image(tmp_path):
    from msclip.eval.zeroshot_report import folder_report, format_report, plan_folder

    _colour_folder(tmp_path / "data", names=COLOURS[:2])
    for name in ("x.png", "y.png"):
        (tmp_path / "data" / "red" / name).write_bytes(b"\x89PNG broken")
    torch.manual_seed(0)
    model = msclip.create_model("clip-b32-tiny").eval()
    rep = folder_report(model, msclip.get_tokenizer(model.cfg), plan_folder(str(tmp_path / "data"), None, "generic"),
                        torch.device("cpu"), model_spec="clip-b32-tiny", checkpoint=None, precision="fp32",
                        batch_size=3)
    assert rep["images"] == 6 and rep["images_scored"] == 4 and rep["skipped_count"] == 2
    assert sorted(Path(s["path"]).name for s in rep["skipped"]) == ["x.png", "y.png"]
    assert all(s["error"] for s in rep["skipped"])
    text = format_report(rep)
    assert "x.png" in text and "y.png" in text
