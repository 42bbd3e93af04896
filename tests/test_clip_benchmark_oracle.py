"""CLIP_benchmark (1.6.2) as an oracle for msclip's zero-shot, retrieval and linear probe, through the msclip
loader that `msclip.interop.clip_benchmark.register()` adds to CLIP_benchmark's table.

The model is a tiny msclip model (attention and MLP shared by both towers) with random trunks whose
ln_post / ln_final standardise the pooled tokens and whose two projections are ridge fits sending the image
embeddings and the prompt embeddings of one digit to the same code (`_make_informative`). Zero-shot is then far
from chance (~89 % on held-out digits, all ten classes predicted), so the equalities below compare real
predictions. It is saved as a run folder and every comparison uses the model, transform and tokenizer that
CLIP_benchmark's own `load_clip("msclip", ...)` returns. Images: scikit-learn's digits (8x8, upscaled by the
model's transform). Where CLIP_benchmark differs by design, the test asserts the difference
(docs/clip-benchmark.md).
"""
from __future__ import annotations

import csv
import importlib.abc
import importlib.machinery
import importlib.util
import json
import shutil
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import msclip
from msclip.config import ModelCfg
from msclip.eval.features import SafeDataset, extract_image_features
from msclip.eval.linear_probe import run_probe
from msclip.eval.metrics import topk_accuracy
from msclip.eval.retrieval import ImageSource, evaluate_retrieval, read_csv_pairs, recall_at_k
from msclip.eval.templates import fill_template
from msclip.eval.zeroshot import build_classifier, evaluate_zeroshot
from msclip.interop import clip_benchmark as mcb

pytest.importorskip("clip_benchmark.models")
datasets = pytest.importorskip("sklearn.datasets")
from clip_benchmark.metrics import linear_probe as cb_lp  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification as cb_zs  # noqa: E402
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret  # noqa: E402
from clip_benchmark.models import MODEL_TYPES, TYPE2FUNC, load_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a picture of a {}.", "the number {}.", "a handwritten {}.",
             "an image of the digit {}.", "a drawing of a {}.", "a scan of a handwritten {}.", "the digit {}, by hand."]
WIDTH = 64  # also the embedding size, so the towers' pooled outputs can be standardised through identity projections
CFG = {"name": "msclip-digits", "embed_dim": WIDTH,
       "vision": {"image_size": 32, "patch_size": 8, "width": WIDTH, "layers": 2, "heads": 2},
       "text": {"context_length": 16, "vocab_size": 49408, "width": WIDTH, "layers": 2, "heads": 2, "truncate": "eot"},
       "share": [{"components": ["attn", "mlp"], "layers": "all"}], "norm_eps": 1e-5, "init_logit_scale": 2.659}
N_FIT = 600  # digits used to fit the projections; zero-shot is scored on the other 1197


class Pairs(Dataset):
    """(image tensor, label); `classes` as CLIP_benchmark's evaluate reads it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=NAMES):
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _standardise(ln: torch.nn.Module, pooled: torch.Tensor) -> None:
    """Set a LayerNorm's affine part so its output is standardised over `pooled` (its output at weight 1, bias 0)."""
    mu, sd = pooled.mean(0), pooled.std(0)
    ln.weight.copy_(1 / sd)
    ln.bias.copy_(-mu / sd)


def _ridge(z: torch.Tensor, y: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    z, y = z.double(), y.double()
    return torch.linalg.solve(z.T @ z + lam * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y).float()


@torch.no_grad()
def _make_informative(model, tokenizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    """A random model's pooled image tokens barely differ between images (official init), so zero-shot would be
    at chance; standardising them and fitting both projections onto shared per-class codes fixes that."""
    codes = torch.linalg.qr(torch.randn(WIDTH, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    prompts = [fill_template(t, n) for n in NAMES for t in TEMPLATES]
    tokens, prompt_class = tokenizer(prompts), torch.arange(10).repeat_interleave(len(TEMPLATES))
    model.image.proj.copy_(torch.eye(WIDTH))
    model.text.proj.copy_(torch.eye(WIDTH))
    _standardise(model.image.ln_post, model.encode_image(images))
    _standardise(model.text.ln_final, model.encode_text(tokens))
    model.image.proj.copy_(_ridge(model.encode_image(images), codes[labels]))
    model.text.proj.copy_(_ridge(model.encode_text(tokens), codes[prompt_class]))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from PIL import Image

    from msclip.eval.loading import eval_transform

    digits = datasets.load_digits()
    pil = [Image.fromarray((x * 255 / 16).astype(np.uint8)).convert("RGB") for x in digits.images]
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    built = msclip.create_model_from_config(ModelCfg.from_dict(CFG)).eval()
    images = torch.stack([eval_transform(built)(im) for im in pil])
    _make_informative(built, msclip.get_tokenizer(built.cfg), images[:N_FIT], labels[:N_FIT])
    folder = tmp_path_factory.mktemp("run")
    msclip.save_pretrained(built, folder)  # a model folder: config.json + model.safetensors + card
    mcb.register()
    model, transform, tokenizer = load_clip(model_type="msclip", model_name=str(folder), pretrained="none",
                                            cache_dir=None, device="cpu")
    return SimpleNamespace(model=model, transform=transform, tokenizer=tokenizer, built=built, pil=pil,
                           images=images, labels=labels, folder=folder)


# ----------------------------------------------------------------------------------- loader
def test_loader_is_registered_and_loads_every_form(bench, tmp_path):
    assert TYPE2FUNC["msclip"] is mcb.load_msclip and MODEL_TYPES.count("msclip") == 1
    mcb.register()
    assert MODEL_TYPES.count("msclip") == 1  # idempotent
    m, x = bench.model, bench.images[:8]
    assert not m.training
    torch.testing.assert_close(m.encode_image(x), bench.built.encode_image(x), rtol=0, atol=0)
    torch.testing.assert_close(bench.transform(bench.pil[3]), bench.images[3], rtol=0, atol=0)
    tokens = bench.tokenizer(["a photo of the digit one.", "two"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    # a JSON config + weights file, the weights file alone (config embedded), a run folder holding only
    # model.safetensors, a folder + its weights by name
    weights = bench.folder / "model.safetensors"
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    (tmp_path / "run").mkdir()
    shutil.copyfile(weights, tmp_path / "run" / "model.safetensors")
    for name, pretrained in ((tmp_path / "cfg.json", weights), (weights, "none"), (tmp_path / "run", "none"),
                             (bench.folder, "model.safetensors")):
        other = load_clip("msclip", str(name), str(pretrained), None, "cpu")[0]
        torch.testing.assert_close(other.encode_image(x), m.encode_image(x), rtol=0, atol=0)
    assert load_clip("msclip", "clip-b32-tiny", "none", None, "cpu")[0].cfg.name == "clip-b32-tiny"
    with pytest.raises(msclip.errors.MissingFileError, match="laion400m_e32"):
        load_clip("msclip", "clip-b32-tiny", "laion400m_e32", None, "cpu")  # CLIP_benchmark's default
    with pytest.raises(msclip.errors.MissingFileError, match="model.safetensors"):
        load_clip("msclip", str(tmp_path), "none", None, "cpu")  # a folder with neither config.json nor weights


# ----------------------------------------------------------------------------------- zero-shot
def _zeroshot_both(bench, idx: torch.Tensor, names=NAMES):
    x, y = bench.images[idx], bench.labels[idx]
    ours = evaluate_zeroshot(bench.model, bench.tokenizer, SafeDataset(Pairs(x, y, names), lambda t: t), names,
                             TEMPLATES, "cpu", batch_size=128)
    theirs = cb_zs.evaluate(bench.model, DataLoader(Pairs(x, y, names), batch_size=128), bench.tokenizer, names,
                            mcb.clip_benchmark_templates(TEMPLATES), device="cpu", amp=False)
    return ours, theirs


def test_zeroshot_equals_clip_benchmark(bench):
    idx = torch.arange(N_FIT, len(bench.labels))
    ours, theirs = _zeroshot_both(bench, idx)
    print(f"zero-shot on {len(idx)} digits: msclip top1 {ours['top1_pct']:.4f} top5 {ours['top5_pct']:.4f} "
          f"mpcr {ours['mean_per_class_recall_pct']:.4f} | CLIP_benchmark acc1 {100 * theirs['acc1']:.4f} "
          f"acc5 {100 * theirs['acc5']:.4f} mpcr {100 * theirs['mean_per_class_recall']:.4f}")
    assert ours["top1_pct"] == pytest.approx(100 * theirs["acc1"], abs=1e-9)
    assert ours["top5_pct"] == pytest.approx(100 * theirs["acc5"], abs=1e-9)
    assert ours["mean_per_class_recall_pct"] == pytest.approx(100 * theirs["mean_per_class_recall"], abs=1e-9)
    assert ours["top1_pct"] > 60  # chance is 10 %
    assert sum(c["correct"] > 0 for c in ours["per_class"]) == 10  # every class is predicted right at least once
    # the classifiers themselves agree (CLIP_benchmark: one batch per class; msclip: length-sorted batches)
    w_ours = build_classifier(bench.model, bench.tokenizer, NAMES, TEMPLATES)
    w_theirs = cb_zs.zero_shot_classifier(bench.model, bench.tokenizer, NAMES, mcb.clip_benchmark_templates(TEMPLATES),
                                          "cpu", amp=False)
    torch.testing.assert_close(w_ours, w_theirs, rtol=0, atol=1e-6)


def test_zeroshot_known_differences(bench):
    # 1. templates: CLIP_benchmark fills `{c}` by keyword, msclip fills `{}` positionally
    with pytest.raises(IndexError):
        cb_zs.zero_shot_classifier(bench.model, bench.tokenizer, NAMES[:2], TEMPLATES, "cpu", amp=False)
    with pytest.raises(KeyError):
        fill_template("a photo of a {c}.", "seven")
    assert mcb.clip_benchmark_templates(["a {}.", "{{literal}} {}"]) == ["a {c}.", "{{literal}} {c}"]
    # 2. amp: CLIP_benchmark's default (the CLI's unless --no_amp) autocasts; on the CPU that is bf16
    templates = mcb.clip_benchmark_templates(TEMPLATES)
    fp32 = cb_zs.zero_shot_classifier(bench.model, bench.tokenizer, NAMES, templates, "cpu", amp=False)
    amp = cb_zs.zero_shot_classifier(bench.model, bench.tokenizer, NAMES, templates, "cpu", amp=True)
    assert (amp.float() - fp32).abs().max() > 1e-3
    # 3. fewer than 5 classes: CLIP_benchmark reports acc5 = nan, msclip top-k with k = the class count
    idx = torch.nonzero((bench.labels < 3) & (torch.arange(len(bench.labels)) >= N_FIT)).flatten()
    ours, theirs = _zeroshot_both(bench, idx, NAMES[:3])
    assert np.isnan(theirs["acc5"]) and ours["top5_k"] == 3 and ours["top5_pct"] == 100.0
    assert ours["top1_pct"] == pytest.approx(100 * theirs["acc1"], abs=1e-9)


def test_numpy2_fix_keeps_clip_benchmark_accuracy(bench):
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(300, 10, generator=g), torch.randint(0, 10, (300,), generator=g)
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    if numpy2:  # the reason for the fix: CLIP_benchmark 1.6.2's own code with the real `float` fails
        original = types.FunctionType(cb_zs.accuracy.__code__, vars(cb_zs))
        with pytest.raises(TypeError, match="0-dimensional"):
            original(logits, target, topk=(1,))
    assert mcb.fix_numpy2_accuracy() is numpy2  # register() already applied it; still reported as needed
    assert cb_lp.accuracy is cb_zs.accuracy
    acc1, acc5 = cb_zs.accuracy(logits, target, topk=(1, 5))
    ours = topk_accuracy(logits, target, (1, 5))
    assert (acc1, acc5) == pytest.approx((ours[1], ours[5]), abs=1e-12)
    assert 0.05 < acc1 < 0.2  # random logits: a non-trivial count


# ----------------------------------------------------------------------------------- retrieval
def _retrieval_set(bench, folder, per_class: int, twins: bool = False):
    """`per_class` held-out digits of each class as PNG files with one caption each (a different template per
    image of a class); with `twins`, each image also gets a byte-identical copy with a caption of its own.
    Returns (msclip's RetrievalSet read from a CSV, CLIP_benchmark's [(file, [captions])])."""
    rows, items = [], []
    for c in range(10):
        idx = torch.nonzero((bench.labels == c) & (torch.arange(len(bench.labels)) >= N_FIT)).flatten()[:per_class]
        for slot, i in enumerate(idx.tolist()):
            copies = [f"{c}_{slot}.png"] + ([f"{c}_{slot}_twin.png"] if twins else [])
            bench.pil[i].save(folder / copies[0])
            for k, name in enumerate(copies):
                if k:
                    shutil.copyfile(folder / copies[0], folder / name)
                caps = [fill_template(TEMPLATES[slot + k * per_class], NAMES[c])]  # unique: no tied texts
                rows += [{"image": name, "caption": cap} for cap in caps]
                items.append((name, caps))
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return read_csv_pairs(folder / "pairs.csv"), items


class Captioned(Dataset):
    """CLIP_benchmark's retrieval datasets: (image tensor, list of captions)."""

    def __init__(self, folder, items, transform):
        self.folder, self.items, self.transform = folder, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        name, caps = self.items[i]
        return self.transform(Image.open(self.folder / name).convert("RGB")), caps


def _captions_collate(batch):  # what CLIP_benchmark's collate does for its caption datasets
    images, caps = zip(*batch)
    return torch.stack(images), list(caps)


def test_retrieval_equals_clip_benchmark(bench, tmp_path):
    data, items = _retrieval_set(bench, tmp_path, per_class=len(TEMPLATES))
    ours = evaluate_retrieval(bench.model, data, torch.device("cpu"), batch_size=16, progress=False)["metrics"]
    loader = DataLoader(Captioned(tmp_path, items, bench.transform), batch_size=16, collate_fn=_captions_collate)
    theirs = cb_ret.evaluate(bench.model, loader, bench.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    print(f"retrieval ({len(items)} images and captions): msclip", {k: round(v, 4) for k, v in ours.items()},
          "| CLIP_benchmark", {k: round(100 * v, 4) for k, v in theirs.items()})
    for k in (1, 5, 10):  # CLIP_benchmark names a direction by what is retrieved
        assert ours[f"text_to_image_R@{k}_pct"] == pytest.approx(100 * theirs[f"image_retrieval_recall@{k}"], abs=1e-9)
        assert ours[f"image_to_text_R@{k}_pct"] == pytest.approx(100 * theirs[f"text_retrieval_recall@{k}"], abs=1e-9)
    assert 10 < ours["text_to_image_R@1_pct"] < 90 and 10 < ours["image_to_text_R@1_pct"] < 90  # neither trivial
    assert ours["text_to_image_R@1_pct"] < ours["text_to_image_R@5_pct"] < ours["text_to_image_R@10_pct"]


def test_retrieval_ties_count_against_only_in_msclip(bench, tmp_path):
    """Byte-identical twin images score exactly alike: msclip ranks the twin ahead of the right image (R@1 = 0
    for every caption), CLIP_benchmark's top-k picks one of the two (the right one for part of the captions)."""
    data, _ = _retrieval_set(bench, tmp_path, per_class=len(TEMPLATES) // 2, twins=True)
    feats = extract_image_features(lambda t: bench.model.encode_image(t, normalize=True),
                                   SafeDataset(ImageSource(data.images), bench.transform), "cpu", progress=False)
    image_emb = feats["features"]
    first = {}
    for i, path in enumerate(data.images):  # make twins bit-identical whatever the batch kernels did
        key = path.replace("_twin", "")
        image_emb[i] = image_emb[first.setdefault(key, i)]
    text_emb = bench.model.encode_text(bench.tokenizer(data.captions), normalize=True).detach()
    owner = torch.tensor(data.caption_image)
    ours = recall_at_k(image_emb, text_emb, owner, ks=(1, 2))
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    theirs = {k: (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
              for k in (1, 2)}
    print(f"twins: msclip text->image R@1 {ours['text_to_image_R@1']:.4f} R@2 {ours['text_to_image_R@2']:.4f} | "
          f"CLIP_benchmark R@1 {theirs[1]:.4f} R@2 {theirs[2]:.4f}")
    assert ours["text_to_image_R@1"] == 0.0 and theirs[1] > 0.1
    assert theirs[2] >= ours["text_to_image_R@2"] > 0.1  # the pair itself is in the top 2 often enough


# ----------------------------------------------------------------------------------- linear probe
class _CpuPassingAsCuda(str):
    """"cpu" to torch, yet equal to "cuda" for linear_probe.evaluate's `assert device == 'cuda'`."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.fixture()
def probe_on_cpu(monkeypatch):
    """CLIP_benchmark's probe is CUDA-only (`.cuda()` calls, DataParallel over the GPUs): run it on the CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # DataParallel then just calls the module
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    return _CpuPassingAsCuda("cpu")


def _probe_splits(bench):
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    return perm[200:], perm[:200], torch.arange(1000, len(bench.labels))  # train, val, test


def _cb_probe(bench, device, root, train, test, val=None, model_id="msclip-digits", epochs=10):
    def loader(idx):
        return DataLoader(Pairs(bench.images[idx], bench.labels[idx]), batch_size=128)

    return cb_lp.evaluate(bench.model, loader(train), loader(test), -1, 128, 0, 0.1, epochs, model_id, 0, str(root),
                          device, val_dataloader=None if val is None else loader(val), normalize=True, amp=False)


def test_linear_probe_within_one_point(bench, tmp_path, probe_on_cpu):
    train, val, test = _probe_splits(bench)
    theirs = _cb_probe(bench, probe_on_cpu, tmp_path, train, test, val)
    feats = extract_image_features(bench.model.encode_image, SafeDataset(Pairs(bench.images, bench.labels),
                                                                       lambda t: t), "cpu", progress=False)
    x, y = feats["features"], feats["labels"]
    cached = torch.load(tmp_path / "msclip-digits" / "features_test.pt", weights_only=True)
    torch.testing.assert_close(cached, torch.nn.functional.normalize(x[test], dim=-1), rtol=0, atol=1e-6)
    ours = run_probe((x[train], y[train]), (x[test], y[test]), "accuracy", val=(x[val], y[val]))
    print(f"linear probe ({len(train)} train, {len(val)} val, {len(test)} test): msclip L-BFGS {100 * ours['score']:.4f} "
          f"(C={ours['hparam']['C']}) | CLIP_benchmark AdamW {100 * theirs['lp_acc1']:.4f} "
          f"(wd={theirs['weight_decay']:.3g})")
    assert abs(ours["score"] - theirs["lp_acc1"]) <= 0.01
    assert ours["score"] > 0.6 and theirs["lp_acc1"] > 0.6  # chance is 0.1


class _Unreadable(Dataset):
    def __len__(self) -> int:
        return 800

    def __getitem__(self, i):
        raise AssertionError("CLIP_benchmark read the new training data")


def test_linear_probe_known_differences(bench, tmp_path, probe_on_cpu):
    train, _, test = _probe_splits(bench)
    # 1. without a validation loader nothing is searched: weight decay 0 (msclip carves a validation split)
    first = _cb_probe(bench, probe_on_cpu, tmp_path, train, test, epochs=3)
    assert first["weight_decay"] == 0 and first["lp_acc1"] > 0.5
    # 2. features are cached under feature_root/model_id only: a second run with other data (here: data that
    # raises when read) silently reuses the first run's features
    stale = cb_lp.evaluate(bench.model, DataLoader(_Unreadable(), batch_size=128), DataLoader(_Unreadable()), -1, 128,
                           0, 0.1, 3, "msclip-digits", 0, str(tmp_path), probe_on_cpu, normalize=True, amp=False)
    assert abs(stale["lp_acc1"] - first["lp_acc1"]) < 0.03  # same features; the sample order follows the global RNG


# ----------------------------------------------------------------------------------- command line
_CLI_EXTRAS = ("requests", "pycocoevalcap")  # imported at the top of clip_benchmark.cli; not installed here


class _Stub(types.ModuleType):
    __path__: list = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import any module under `roots` as an empty stub (only to import clip_benchmark.cli; never called)."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def test_cli_main_evaluates_an_msclip_model(bench, tmp_path, monkeypatch):
    missing = [m for m in _CLI_EXTRAS if importlib.util.find_spec(m) is None]
    before = set(sys.modules)
    try:
        if missing:  # without them the CLI cannot start; main() says which package is missing
            with pytest.raises(mcb.ClipBenchmarkError, match="|".join(missing)):
                mcb.main(["eval"])
            monkeypatch.setattr(sys, "meta_path", [_StubFinder(missing), *sys.meta_path])
        import clip_benchmark.cli as cli

        idx = torch.arange(N_FIT, N_FIT + 300)
        data = Pairs(bench.images[idx], bench.labels[idx])
        data.templates = mcb.clip_benchmark_templates(TEMPLATES)
        monkeypatch.setattr(cli, "build_dataset", lambda **kw: data)  # the one piece that would download
        monkeypatch.setattr(sys, "argv", ["clip_benchmark"])
        out = tmp_path / "result.json"
        mcb.main(["eval", "--model_type", "msclip", "--model", str(bench.folder), "--pretrained", "none",
                  "--dataset", "digits", "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0",
                  "--batch_size", "128", "--output", str(out), "--quiet"])
        result = json.loads(out.read_text())
    finally:
        for name in set(sys.modules) - before:  # nothing imported against the stubs outlives the test
            if name.split(".")[0] in _CLI_EXTRAS or name.startswith(("clip_benchmark.cli", "clip_benchmark.datasets")):
                del sys.modules[name]
    ours = evaluate_zeroshot(bench.model, bench.tokenizer, SafeDataset(data, lambda t: t), NAMES, TEMPLATES, "cpu")
    assert result["model"] == str(bench.folder) and result["task"] == "zeroshot_classification"
    assert 100 * result["metrics"]["acc1"] == pytest.approx(ours["top1_pct"], abs=1e-9) and ours["top1_pct"] > 60
