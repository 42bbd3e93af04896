"""Audit of `msclip analyze` (modality gap, per-layer NMI, report, attention maps), the export helpers around the
ONNX graphs (`preprocess.json` signatures, the command's check) and the CLIP_benchmark loader, by mutation testing:
each test pins a promise of docs/analysis.md, docs/export.md or docs/clip-benchmark.md that no other test held.
The ONNX conversion itself is checked (slowly) by tests/test_export.py; here the exporter is stubbed where a test
only needs what surrounds it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msclip
from msclip.analysis import attention_maps, pipeline, plots
from msclip.analysis.modality import kmeans, layerwise_nmi, modality_gap, modality_nmi, normalized_mutual_info
from msclip.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "clip-b32-tiny"  # 6 trunk layers, 2 heads, image 64, context 32
COMMON = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "16"]


def _inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    x = x.double()
    return sum(float((x[labels == j] - x[labels == j].mean(0)).pow(2).sum()) for j in labels.unique())


# ----------------------------------------------------------------------------------- statistics
def test_gap_normalises_each_embedding_then_averages():
    """The gap is the distance of the centroids of the L2-normalised embeddings (each row normalised, then averaged)."""
    e = torch.eye(3)
    img = torch.stack([e[0], 10 * e[1]])  # norms 1 and 10: normalised, the same as the text rows
    assert modality_gap(img, torch.stack([e[0], e[1]])) == pytest.approx(0.0, abs=1e-12)
    # centroid of the normalised images (0.5, 0.5, 0) vs the text's (1, 0, 0): sqrt(0.5)
    assert modality_gap(img, 3 * e[:1]) == pytest.approx(0.5 ** 0.5, abs=1e-12)


def test_nmi_degenerate_labellings():
    """Two constant labellings agree perfectly (1, as scikit-learn says); one constant labelling carries none (0)."""
    same = torch.zeros(6, dtype=torch.long)
    assert normalized_mutual_info(same, same + 3) == 1.0
    assert normalized_mutual_info(same, torch.tensor([0, 1, 0, 1, 0, 1])) == 0.0


def test_kmeans_returns_a_converged_partition():
    """Lloyd iterations run to a fixed point: every point is nearest to the mean of its own cluster."""
    x = torch.rand(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = kmeans(x, 2, seed=0)
    means = torch.stack([x[labels == j].mean(0) for j in range(2)])
    assert torch.equal(torch.cdist(x, means).argmin(1), labels)


def test_kmeans_keeps_the_restart_of_least_inertia():
    """Of the n_init restarts the one with the smallest inertia is returned (4 blobs on a rectangle: the split
    into left / right halves, not the local optimum top / bottom that some restarts reach)."""
    g = torch.Generator().manual_seed(0)
    corners = torch.tensor([[-2.0, 1.5], [2.0, 1.5], [-2.0, -1.5], [2.0, -1.5]])
    x = (corners.repeat_interleave(25, 0) + 0.05 * torch.randn(100, 2, generator=g)).double()
    singles = [_inertia(x, kmeans(x, 2, n_init=1, seed=s)) for s in range(10)]
    assert max(singles) > 1.5 * min(singles)  # single restarts do reach the worse local optimum
    best = kmeans(x, 2, n_init=10, seed=0)
    left = (x[:, 0] < 0).long()
    assert normalized_mutual_info(best, left) == pytest.approx(1.0)


def test_kmeans_plus_plus_seeding_finds_an_outlier_with_one_restart():
    """The second centre is drawn in proportion to the squared distance (k-means++): the seeds alone (one restart,
    one assignment) already give a lone far point its own cluster."""
    x = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 10.0)])
    for seed in range(5):
        labels = kmeans(x, 2, n_init=1, iters=1, seed=seed)
        assert labels[:99].unique().numel() == 1 and labels[99] != labels[0], seed


def _norm_only(n: int = 60, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and texts with the same directions, differing only in norm (texts 5x longer)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.ones(dim)
    img = c + 0.3 * torch.randn(n, dim, generator=g)
    txt = 5 * (c + 0.3 * torch.randn(n, dim, generator=g))
    return img, txt


def test_modality_nmi_normalises_unless_asked_not_to():
    """Pooled states are L2-normalised before clustering by default (a norm difference alone does not separate
    the modalities); normalize=False (--raw-pooled) clusters them as they are."""
    img, txt = _norm_only()
    assert modality_nmi(img, txt, normalize=False) == pytest.approx(1.0)
    assert modality_nmi(img, txt, normalize=True) < 0.3


def test_layerwise_nmi_pairs_by_trunk_index_skips_width_mismatch_and_passes_options():
    """Rows pair the image and text states of the same trunk layer (not the same list position), give that
    layer's centroid gap, skip layers of different widths, and honour normalize=False."""
    g = torch.Generator().manual_seed(0)
    img = [torch.randn(40, 8, generator=g) for _ in range(2)] + [torch.randn(40, 8, generator=g)]
    txt = [torch.randn(40, 8, generator=g) + 6 * torch.eye(8)[0],  # layer 0: far from every image layer
           torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g),  # layers 1, 2: like the images
           torch.randn(40, 4, generator=g)]  # layer 3: another width
    rows = layerwise_nmi(img, txt, image_layers=[1, 2, 3], text_layers=[0, 1, 2, 3])
    assert [r["layer"] for r in rows] == [1, 2]
    assert all(r["nmi"] < 0.3 for r in rows)  # same distribution: mixed
    for r, i, t in zip(rows, img, txt[1:3]):
        assert r["gap"] == pytest.approx(modality_gap(i, t)) and r["gap"] > 0
    raw_img, raw_txt = _norm_only()
    raw = layerwise_nmi([raw_img], [raw_txt], [0], [0], normalize=False)
    assert raw[0]["nmi"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- attention maps and plots
def test_cls_attention_takes_the_class_token_row_over_the_patches():
    """The image map is row 0 (class token) of each head, over the patch tokens only (the class column dropped)."""
    attn = torch.rand(2, 5, 5)
    got = attention_maps.cls_attention(attn, (2, 2))
    torch.testing.assert_close(got, attn[:, 0, 1:].reshape(2, 2, 2))


def test_patch_grid_falls_back_to_one_row():
    """A patch count that is not a square and matches no given image size is drawn as one row."""
    assert attention_maps.patch_grid(1 + 12) == (1, 12)
    assert attention_maps.patch_grid(1 + 12, (96, 128), 32) == (3, 4)


def test_denormalize_inverts_the_model_normalisation():
    """denormalize undoes (pixel - mean) / std, giving the displayable HxWx3 image in [0, 1]."""
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    pic = torch.rand(3, 4, 5)
    x = (pic - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    np.testing.assert_allclose(attention_maps.denormalize(x, mean, std), pic.permute(1, 2, 0).numpy(), atol=1e-6)


@pytest.fixture()
def figures(monkeypatch):
    """The figures the plotting helpers would save (nothing is written)."""
    saved = []

    def keep(fig, path, dpi=110):
        saved.append(fig)
        return Path(path)

    monkeypatch.setattr(attention_maps, "save_figure", keep)
    monkeypatch.setattr(plots, "save_figure", keep)
    yield saved
    plt = plots.pyplot()
    for fig in saved:
        plt.close(fig)


def test_attention_panels_show_the_chosen_heads(figures, tmp_path):
    """--attn-heads: the panel titled 'head h' shows head h's map, for images and captions."""
    attn = torch.rand(3, 5, 5)
    attention_maps.save_image_attention(attn, tmp_path / "i.png", heads=[2])
    attention_maps.save_text_attention(attn, ["a", "b", "c"], tmp_path / "t.png", heads=[2])
    image_ax, text_ax = figures[0].axes[0], figures[1].axes[0]
    assert image_ax.get_title() == "head 2" and text_ax.get_title() == "head 2"
    np.testing.assert_allclose(np.asarray(image_ax.images[0].get_array()), attn[2, 0, 1:].reshape(2, 2).numpy())
    np.testing.assert_allclose(np.asarray(text_ax.images[0].get_array()), attn[2, :3, :3].numpy())


def test_layer_plot_draws_the_requested_statistic(figures, tmp_path):
    """gap.png plots the gap column and nmi.png the NMI column, against the trunk layer."""
    rows = [{"layer": 1, "nmi": 0.9, "gap": 0.3}, {"layer": 2, "nmi": 0.5, "gap": 0.7}]
    plots.save_layer_plot(rows, "gap", "gap", tmp_path / "gap.png")
    line = figures[0].axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [0.3, 0.7]


# ----------------------------------------------------------------------------------- msclip analyze, end to end
def _noise_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """`msclip analyze` on a saved tiny model: a list file (relative paths, run from another folder) whose first
    entry is unreadable, 14 captions with --max-samples 12, --raw-pooled, default attention layers; the statistics
    and drawing helpers are watched."""
    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    model = msclip.create_model(TINY).eval()
    msclip.save_pretrained(model, root / "model")
    _noise_images(root / "imgs", 12)
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    lines = ["../imgs/broken.png"] + [f"../imgs/{i:02d}.png" for i in range(12)]
    (root / "lists").mkdir()
    (root / "lists" / "images.txt").write_text("\n".join(lines) + "\n")
    captions = [f"caption {'word ' * (i % 4)}number {i}" for i in range(14)]
    (root / "texts.txt").write_text("\n".join(captions[:3] + [""] + captions[3:]) + "\n")
    (root / "elsewhere" / "deeper").mkdir(parents=True)  # where ../imgs does not exist
    seen: dict = {"layerwise": [], "nmi": [], "image_titles": [], "text_labels": []}
    real_lw, real_nmi = pipeline.layerwise_nmi, pipeline.modality_nmi

    def lw(*a, **kw):
        seen["layerwise"].append(kw.get("normalize"))
        return real_lw(*a, **kw)

    def nmi(*a, **kw):
        seen["nmi"].append(kw.get("normalize"))
        return real_nmi(*a, **kw)

    def draw_image(attn, path, heads, pic, title=""):
        seen["image_titles"].append(title)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        return Path(path)

    def draw_text(attn, labels, path, heads, title=""):
        seen["text_labels"].append((title, list(labels)))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        return Path(path)

    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in (("layerwise_nmi", lw), ("modality_nmi", nmi), ("save_image_attention", draw_image),
                         ("save_text_attention", draw_text)):
            mp.setattr(pipeline, name, fn)
        mp.chdir(root / "elsewhere" / "deeper")
        rc = main(["analyze", "--model", str(root / "model"), *COMMON, "--images", str(root / "lists" / "images.txt"),
                   "--texts", str(root / "texts.txt"), "--output-dir", str(out), "--max-samples", "12",
                   "--raw-pooled", "--attn-samples", "2"])
    assert rc == 0
    return {"model": model, "root": root, "out": out, "seen": seen, "captions": captions[:12],
            "kept": [str(root / "lists" / ln) for ln in lines[1:12]], "broken": str(root / "lists" / lines[0]),
            "report": json.loads((out / "analysis.json").read_text()),
            "pooled": torch.load(out / "pooled_hidden.pt", weights_only=True)}


def test_analyze_reads_a_list_file_relative_to_itself_and_counts_what_it_used(analyzed):
    """List-file paths are relative to the file's folder; --max-samples caps images and captions; the unreadable
    image is skipped, counted and absent from the kept paths."""
    rep, pooled = analyzed["report"], analyzed["pooled"]
    assert rep["images"] == 11 and rep["texts"] == 12 and rep["skipped_images"] == 1
    assert [s["path"] for s in rep["skipped"]] == [analyzed["broken"]]
    assert rep["blank_caption_lines"] == [4]
    assert pooled["image_paths"] == analyzed["kept"] and pooled["texts"] == analyzed["captions"]


def test_analyze_pooled_states_and_embeddings_are_the_models(analyzed):
    """pooled_hidden.pt holds, per trunk layer, each kept image's class token and each caption's end token, and
    the final embeddings, as the model computes them."""
    from msclip.eval.loading import eval_transform

    model, pooled = analyzed["model"], analyzed["pooled"]
    tf = eval_transform(model)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in analyzed["kept"]])
    tokens = msclip.get_tokenizer(model.cfg)(analyzed["captions"])
    with torch.no_grad():
        fi = model.forward_intermediates(images=x, tokens=tokens)
        ref_ie, ref_te = model.encode_image(x), model.encode_text(tokens)
    assert pooled["image_layers"] == list(range(6)) and pooled["text_layers"] == list(range(6))
    torch.testing.assert_close(pooled["image_pooled"], torch.stack(fi["image_pooled"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled["text_pooled"], torch.stack(fi["text_pooled"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled["image_embeddings"], ref_ie, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled["text_embeddings"], ref_te, rtol=0, atol=1e-4)


def test_analyze_report_numbers_come_from_the_final_embeddings_and_each_layer(analyzed):
    """modality_gap / embedding_nmi are those of the final embeddings (NMI always on normalised embeddings);
    each layer row's gap is that layer's; --raw-pooled reaches the layer clustering and the report."""
    rep, pooled, seen = analyzed["report"], analyzed["pooled"], analyzed["seen"]
    ie, te = pooled["image_embeddings"], pooled["text_embeddings"]
    assert rep["modality_gap"] == pytest.approx(modality_gap(ie, te), abs=1e-9)
    assert rep["pooled_normalised_before_clustering"] is False and seen["layerwise"] == [False]
    assert seen["nmi"][-1] is True  # the embedding NMI (the last modality_nmi call)
    for r in rep["layers"]:
        assert r["gap"] == pytest.approx(modality_gap(pooled["image_pooled"][r["layer"]],
                                                      pooled["text_pooled"][r["layer"]]), abs=1e-9)


def test_analyze_draws_default_layers_and_the_drawn_samples(analyzed):
    """Default attention layers are first, middle and last; --attn-samples images and captions are drawn, titled
    by the drawn image's own file name, and each caption over its tokens up to and including the end token."""
    rep, seen, model = analyzed["report"], analyzed["seen"], analyzed["model"]
    assert rep["attention_layers"] == [0, 3, 5]
    names = [Path(p).name for p in analyzed["kept"][:2]]
    assert sorted({t.split(" | ")[0] for t in seen["image_titles"]}) == sorted(names)
    assert len(seen["image_titles"]) == 6 and len(seen["text_labels"]) == 6
    tokens = msclip.get_tokenizer(model.cfg)(analyzed["captions"][:2])
    for title, labels in seen["text_labels"]:
        j = 0 if analyzed["captions"][0][:20] in title else 1
        assert len(labels) == int(tokens[j].argmax()) + 1
    assert len(rep["attention_pngs"]) == 12


def test_analyze_report_markdown_shows_counts_and_table(analyzed):
    """report.md gives the unreadable and blank-line counts and one table row per layer."""
    md = (analyzed["out"] / "report.md").read_text()
    assert "11 images (1 unreadable skipped), 12 captions (1 blank lines dropped)" in md
    for r in analyzed["report"]["layers"]:
        assert f"| {r['layer']} | {r['nmi']:.3f} | {r['gap']:.4f} |" in md


def test_analyze_notes_layers_the_images_skip(tmp_path):
    """MS-CLIP-S images skip trunk layer 0: no row for it, and a note says no image attention is drawn there."""
    torch.manual_seed(0)
    model = msclip.create_model("msclip-s-b32-tiny").eval()
    paths = _noise_images(tmp_path / "imgs", 10)
    inputs = pipeline.AnalysisInputs([str(p) for p in paths], [f"caption {i}" for i in range(10)])
    rep = pipeline.analyze(model, msclip.get_tokenizer(model.cfg), inputs, tmp_path / "out", torch.device("cpu"),
                           attn_layers=[0, 5], attn_samples=0, progress=False)
    assert [r["layer"] for r in rep["layers"]] == [1, 2, 3, 4, 5]
    assert rep["notes"] == ["images do not pass trunk layer(s) [0]; no image attention drawn there"]


def test_report_markdown_lists_notes(tmp_path):
    """Every note of the report is in report.md."""
    report = {"model": {"spec": "m"}, "images": 10, "skipped_images": 0, "texts": 10, "blank_caption_lines": [],
              "modality_gap": 0.5, "embedding_nmi": 1.0, "layers": [], "plots": [], "attention_pngs": [],
              "notes": ["images do not pass trunk layer(s) [0]"], "skipped": []}
    assert "Note: images do not pass trunk layer(s) [0]." in pipeline.report_markdown(report, tmp_path)


# ----------------------------------------------------------------------------------- analyze: bad input
def _pairs(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    _noise_images(tmp_path / "imgs", n)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"caption {i}" for i in range(n)) + "\n")
    return tmp_path / "imgs", texts


@pytest.mark.parametrize("flag", ["--max-samples", "--attn-samples"])
def test_analyze_refuses_negative_sample_counts(tmp_path, monkeypatch, capsys, flag):
    """A negative --max-samples / --attn-samples is a usage error naming the flag, before any work."""
    images, texts = _pairs(tmp_path, 11)  # -1 would leave 10: enough to run

    def ran(*a, **kw):
        raise AssertionError(f"the analysis ran with {flag} -1")

    monkeypatch.setattr(pipeline, "analyze", ran)
    assert main(["analyze", "--model", TINY, *COMMON, "--images", str(images), "--texts", str(texts),
                 "--output-dir", str(tmp_path / "out"), flag, "-1"]) == 2
    assert flag in capsys.readouterr().err


def test_analyze_refuses_a_head_the_model_lacks(tmp_path, capsys):
    """--attn-heads beyond the model's heads is an error (exit 2) naming the head, not a traceback."""
    images, texts = _pairs(tmp_path)
    rc = main(["analyze", "--model", TINY, *COMMON, "--images", str(images), "--texts", str(texts),
               "--output-dir", str(tmp_path / "out"), "--attn-heads", "7", "--attn-layers", "0",
               "--attn-samples", "1"])
    assert rc == 2 and "7" in capsys.readouterr().err


def test_analyze_refuses_a_layer_the_model_lacks(tmp_path, capsys):
    """--attn-layers beyond the trunk is an error (exit 2) naming the layer."""
    images, texts = _pairs(tmp_path)
    rc = main(["analyze", "--model", TINY, *COMMON, "--images", str(images), "--texts", str(texts),
               "--output-dir", str(tmp_path / "out"), "--attn-layers", "99", "--attn-samples", "0"])
    assert rc == 2 and "99" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- export (exporter stubbed)
class _Stop(Exception):
    pass


def test_graph_signatures_in_preprocess_json_match_the_docs():
    """preprocess.json's graph entries: `images` float32 [batch, 3, S, S] and `tokens` int64 [batch, seq] in,
    `features` float32 [batch, embed_dim] out, unnormalised."""
    from msclip.export.onnx import _graph_spec

    model = msclip.create_model(TINY)
    image, text = _graph_spec(model, "image"), _graph_spec(model, "text")
    assert image["file"] == "image_encoder.onnx" and text["file"] == "text_encoder.onnx"
    assert image["input"] == {"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    assert {k: text["input"][k] for k in ("name", "shape", "dtype")} == {"name": "tokens", "shape": ["batch", "seq"],
                                                                        "dtype": "int64"}
    assert text["input"]["seq"].startswith("1..32")
    for spec in (image, text):
        assert spec["output"] == {"name": "features", "shape": ["batch", 32], "dtype": "float32", "normalized": False}


def test_export_onnx_exports_an_fp32_eval_model_and_refuses_a_file_as_output(tmp_path, monkeypatch):
    """export_onnx traces the model in fp32 and eval mode (fp32 graphs whatever the model's precision), and
    refuses an --output that is a file before any tracing."""
    import msclip.export.onnx as mo

    traced = []
    monkeypatch.setattr(mo, "_require", lambda module: None)  # the optional packages are not needed before tracing

    def capture(m):
        traced.append((next(m.parameters()).dtype, m.training))
        raise _Stop

    monkeypatch.setattr(mo, "export_encoders", capture)
    model = msclip.create_model(TINY).to(torch.bfloat16).train()
    with pytest.raises(_Stop):
        mo.export_onnx(model, tmp_path / "onnx")
    assert traced == [(torch.float32, False)]
    (tmp_path / "file").write_text("x")
    with pytest.raises(mo.ExportError, match="exists and is not a folder"):
        mo.export_onnx(model, tmp_path / "file")
    assert len(traced) == 1


def test_export_encoders_traces_in_eval_and_restores_training_mode(monkeypatch):
    """export_encoders traces both encoders in eval mode and leaves the model in the mode it was given."""
    import msclip.export.torch_export as te

    modes = []
    monkeypatch.setattr(te, "export_encoder", lambda m, kind: modes.append((kind, m.training)) or kind)
    model = msclip.create_model(TINY).train()
    assert te.export_encoders(model) == {"image": "image", "text": "text"}
    assert modes == [("image", False), ("text", False)] and model.training


def test_onnxruntime_comparison_is_the_max_abs_difference_on_full_tokens(monkeypatch):
    """compare_with_onnxruntime reports, per graph, the largest absolute difference to the torch encoders on
    the very inputs given (text untrimmed)."""
    import msclip.export.onnx as mo

    model = msclip.create_model(TINY).eval()

    def fake_run(sessions, kind, inputs):
        with torch.no_grad():
            out = (model.encode_image(inputs) if kind == "image" else model.encode_text(inputs, trim=False)).numpy()
        if kind == "image":
            out[1, 3] += 0.25
        return out

    monkeypatch.setattr(mo, "onnx_sessions", lambda d: {})
    monkeypatch.setattr(mo, "run_onnx", fake_run)
    images = torch.randn(2, 3, 64, 64)
    tokens = msclip.get_tokenizer(model.cfg)(["a cat", "a much longer caption about a dog"])
    diffs = mo.compare_with_onnxruntime(model, "unused", images, tokens)
    assert diffs["image"] == pytest.approx(0.25, abs=1e-5) and diffs["text"] <= 1e-6


def _export_cmd(tmp_path, monkeypatch, diffs, *extra):
    import msclip.commands.export as cmd
    import msclip.export.onnx as mo

    checked = []
    monkeypatch.setattr(mo, "export_onnx", lambda model, out, opset=None: {"opset": 20})
    monkeypatch.setattr(cmd, "_check", lambda model, out: checked.append(out) or diffs)
    return main(["export", "--model", TINY, "--output", str(tmp_path / "onnx"), *extra]), checked


def test_export_command_fails_above_the_tolerance(tmp_path, monkeypatch, capsys):
    """`msclip export` exits 1 with a warning when a graph differs from the model by more than 1e-4, 0 below."""
    assert _export_cmd(tmp_path, monkeypatch, {"image": 2e-4, "text": 0.0})[0] == 1
    assert "warning" in capsys.readouterr().out
    assert _export_cmd(tmp_path, monkeypatch, {"image": 5e-5, "text": 5e-5})[0] == 0


def test_export_command_no_check_skips_the_comparison(tmp_path, monkeypatch):
    """--no-check skips the ONNX Runtime comparison."""
    rc, checked = _export_cmd(tmp_path, monkeypatch, {"image": 1.0, "text": 1.0}, "--no-check")
    assert rc == 0 and checked == []


def test_export_check_uses_an_untraced_batch_and_trimmed_tokens(monkeypatch):
    """The command's check runs the graphs at batch 3 (traced at 2) and on tokens trimmed below the context
    length that keep every row's EOT."""
    import msclip.commands.export as cmd
    import msclip.export.onnx as mo

    model = msclip.create_model(TINY)
    got = {}
    monkeypatch.setattr(mo, "compare_with_onnxruntime",
                        lambda m, out, images, tokens: got.update(images=images, tokens=tokens) or {})
    cmd._check(model, "unused")
    assert tuple(got["images"].shape) == (3, 3, 64, 64)
    tokens = got["tokens"]
    assert tokens.shape[0] == 3 and 1 < tokens.shape[1] < model.cfg.text.context_length
    assert bool((tokens.max(1).values == model.cfg.text.vocab_size - 1).all())  # every row still has its EOT


def test_export_opset_with_folder_format_is_a_usage_error(tmp_path, capsys):
    """--opset with --format folder is refused (exit 2), naming --opset."""
    assert main(["export", "--model", TINY, "--format", "folder", "--opset", "17",
                 "--output", str(tmp_path / "f")]) == 2
    assert "--opset applies to --format onnx only" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------------- CLIP_benchmark loader
@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = msclip.create_model(TINY)
    folder = tmp_path_factory.mktemp("cb") / "model"
    msclip.save_pretrained(model, folder)
    return folder


def test_loader_no_weights_words_are_case_insensitive():
    """'None', 'RANDOM', ' none ' and '' all mean random weights."""
    from msclip.interop.clip_benchmark import resolve

    for word in ("None", "RANDOM", " none ", ""):
        assert resolve(TINY, word) == (TINY, None), word


def test_loader_folder_with_weights_relative_to_the_working_directory(tmp_path, monkeypatch):
    """For a model folder, --pretrained may be a file relative to the working directory (before a name inside
    the folder)."""
    from msclip.interop.clip_benchmark import resolve

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "other.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve("folder", "w/other.safetensors") == ("folder", "w/other.safetensors")


def test_loader_precision_applies_to_every_form_and_bad_precision_is_refused(saved_folder):
    """precision="bf16" gives a bf16 eval-mode model for a named config + weights and for a weights file alone
    (config embedded); an unknown precision is an error naming it."""
    from msclip.interop.clip_benchmark import ClipBenchmarkError, load_msclip

    weights = str(saved_folder / "model.safetensors")
    for name, pretrained in ((TINY, weights), (weights, "none")):
        model = load_msclip(name, pretrained, device="cpu", precision="bf16")[0]
        assert next(model.parameters()).dtype == torch.bfloat16 and not model.training, name
    with pytest.raises(ClipBenchmarkError, match="'fp64'"):
        load_msclip(TINY, "none", precision="fp64")


def test_templates_numbered_placeholder_is_converted():
    """msclip templates written with '{0}' become CLIP_benchmark's '{c}' as '{}' does."""
    from msclip.interop.clip_benchmark import ClipBenchmarkError, clip_benchmark_templates

    assert clip_benchmark_templates(["a photo of a {0}.", "a {}."]) == ["a photo of a {c}.", "a {c}."]
    with pytest.raises(ClipBenchmarkError, match="'a photo' has no"):
        clip_benchmark_templates(["a photo"])


def test_loader_folder_does_not_claim_random_weights(saved_folder, caplog):
    """A model folder loaded with pretrained 'none' uses its own weights and no message says they are random."""
    from msclip.interop.clip_benchmark import load_msclip

    with caplog.at_level(logging.INFO):
        load_msclip(str(saved_folder), "none")
    assert not [r for r in caplog.records if "random" in r.getMessage().lower()]
