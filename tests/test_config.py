"""Configs: named ones build with the official counts, bad ones fail with a message naming the fault."""
import json
from pathlib import Path

import pytest
import torch

import msclip
from msclip.checkpoint import save_official
from msclip.config import ConfigError, ModelCfg
from msclip.convert import to_official
from msclip.model import MSCLIP
from msclip.official_config import load_official_yaml
from reference_utils import REF_DIR, SPEC_MANIFESTS, read_manifest

REPO = Path(__file__).resolve().parents[1]
RELEASED = {"b32-yfcc-msclips": ("b32-yfcc", 132_408_001), "b32-laion-msclips": ("b32-laion", 132_408_001),
            "b16-yfcc-msclips": ("b16-yfcc", 132_503_617)}


def meta_model(cfg: ModelCfg) -> MSCLIP:
    with torch.device("meta"):
        return MSCLIP(cfg)


@pytest.mark.parametrize("name", msclip.list_models())
def test_named_configs_build(name):
    cfg = msclip.get_model_config(name)
    assert ModelCfg.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # JSON round trip
    if name.endswith("-tiny"):
        model = msclip.create_model(name)
        images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = msclip.get_tokenizer(name)(["a cat", "a dog on a mat"])
        out = model(images, tokens)
        assert out["image_features"].shape == out["text_features"].shape == (2, cfg.embed_dim)
        assert torch.isfinite(out["image_features"]).all()


@pytest.mark.parametrize("yaml_name", sorted(RELEASED))
def test_released_yaml_counts_and_manifest(yaml_name):
    tag, total = RELEASED[yaml_name]
    cfg = load_official_yaml(REPO / "experiments" / "model" / f"{yaml_name}.yaml").model_cfg
    model = meta_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == total
    manifest = read_manifest(SPEC_MANIFESTS / f"official-manifest-{tag}-msclips.tsv")
    official = to_official(model.state_dict(), cfg)
    assert len(official) == 521
    assert {k: tuple(v.shape) for k, v in official.items()} == {r["key"]: r["shape"] for r in manifest}


def test_named_msclip_s_matches_released_architecture():
    for name, yaml_name in (("msclip-s-b32", "b32-laion-msclips"), ("msclip-s-b16", "b16-yfcc-msclips")):
        named = msclip.get_model_config(name).to_dict()
        released = load_official_yaml(REPO / "experiments" / "model" / f"{yaml_name}.yaml").model_cfg
        a, b = meta_model(msclip.get_model_config(name)), meta_model(released)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert msclip.get_model_config(name).stem_strides() == released.stem_strides()
        assert msclip.get_model_config(name).parallel_strides() == released.parallel_strides()
        assert named["norm_eps"] == 1e-12


def test_reference_yaml_loads_standalone():
    cfg = load_official_yaml(REF_DIR / "config.yaml").model_cfg
    assert (cfg.vision.heads, cfg.text.heads) == (1, 4)  # official: image heads = width // 64
    assert cfg.text.truncate == "hard" and cfg.vision.stem == "conv"


def write_yaml(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_base_merge_and_overrides(tmp_path):
    base = (REPO / "experiments" / "model" / "b32.yaml").read_text()
    write_yaml(tmp_path, base, "b32.yaml")
    path = write_yaml(tmp_path, "BASE: ['b32.yaml']\nMODEL:\n  SPEC:\n    TEXT:\n      WIDTH: 768\n      HEADS: 12\n")
    cfg = load_official_yaml(path).model_cfg
    assert (cfg.text.width, cfg.text.heads, cfg.vision.width) == (768, 12, 768)
    assert cfg.share == []


@pytest.mark.parametrize("text, needle", [
    ("MODEL:\n  NAME: clip_openai\nBOGUS: 1\n", "BOGUS"),
    ("MODEL:\n  NAME: clip_openai\n  SPEC:\n    VISION:\n      WIDTHH: 768\n", "WIDTHH"),
    ("MODEL:\n  NAME: clip_openai_pe_res_v1\nCUSTOM:\n  GUMBEL_SELECT: True\n", "CUSTOM.GUMBEL_SELECT"),
    ("MODEL:\n  NAME: clip_openai_pe_res_v1\nCUSTOM:\n  EARLY_CONV: True\n  EARLY_CONV_RES: True\n"
     "  EARLY_CONV_NEW_IMPLEMENT: True\n  EARLY_CONV_RES_BLOCK: bottleneck\n", "EARLY_CONV_RES_BLOCK"),
    ("MODEL:\n  NAME: resnet\n", "MODEL.NAME"),
    ("AMP:\n  ENABLED: true\n  TURBO: 1\nMODEL:\n  NAME: clip_openai\n", "AMP.TURBO"),
])
def test_yaml_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_official_yaml(write_yaml(tmp_path, text))


def test_missing_base_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_official_yaml(write_yaml(tmp_path, "BASE: ['nope.yaml']\n"))


def tiny_dict(**overrides):
    d = msclip.get_model_config("msclip-b32-tiny").to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d["vision"].update(depth=3), "depth"),
    (lambda d: d["text"].update(width=96, heads=2), "needs equal widths"),
    (lambda d: d["share"][0].update(components=["attn", "ffn"]), "ffn"),
    (lambda d: d["share"][0].update(layers=[0, 9]), "layer 9"),
    (lambda d: d["share"][0].update(layers="some"), "share"),
    (lambda d: d["vision"].update(heads=5), "divisible"),
    (lambda d: d.update(parallel={"lateral_layers": [3, 1]}), "increasing"),
    (lambda d: d["text"].update(truncate="middle"), "truncate"),
])
def test_bad_model_configs(mutate, needle):
    d = tiny_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=needle):
        ModelCfg.from_dict(d)


def test_shared_heads_may_differ():
    d = tiny_dict()
    d["vision"]["heads"], d["text"]["heads"] = 1, 4
    model = MSCLIP(ModelCfg.from_dict(d))
    assert model.trunk.heads == {"image": 1, "text": 4}


def test_json_config_file_and_registration(tmp_path, monkeypatch):
    from msclip import factory

    factory.list_models()  # the registry filled, then copied: the registration ends with this test
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(tiny_dict()))
    assert msclip.create_model(str(path)).cfg.name == "my-model"
    msclip.add_model_config(path)
    assert "my-model" in msclip.list_models()
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        msclip.get_model_config("nope")


def test_official_export_file(tmp_path):
    model = msclip.create_model("msclip-s-b32-tiny")
    save_official(model, tmp_path / "ckpt.pth")
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    shared = [k for k in model.state_dict() if ".shared." in k]
    assert len(state) == len(model.state_dict()) + len(shared)


PE_RES = "MODEL:\n  NAME: clip_openai_pe_res_v1\nCUSTOM:\n"


@pytest.mark.parametrize("custom", ["  LORA_WHERE_ADD: v0\n  GUMBEL_SELECT: False\n  OUTPUT_ATTN_RAW: False\n",
                                    "  CUSTOM_ATTN: True\n", "  CUSTOM_ATTN: False\n", "  N_LAYERS: -1\n"])
def test_official_switches_at_their_off_value_are_accepted(tmp_path, custom):
    load_official_yaml(write_yaml(tmp_path, PE_RES + custom))


def test_official_switches_not_implemented_vs_unknown(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_official_yaml(write_yaml(tmp_path, PE_RES + "  LORA_WHERE_ADD: v1\n  LORA_OPEN: True\n"
                                      "  LORA_WHERE_ADDD: v0\n"))
    msg = str(info.value)
    assert "CUSTOM.LORA_WHERE_ADD='v1' is an official switch that msclip does not implement" in msg
    assert "CUSTOM.LORA_OPEN=True is an official switch that msclip does not implement" in msg
    assert "CUSTOM.LORA_WHERE_ADDD is unknown: the official code has no such switch (did you mean " \
           "'LORA_WHERE_ADD'?)" in msg
    assert "LORA_WHERE_ADDD is an official" not in msg


def test_official_lr_share_wd_share_are_returned(tmp_path):
    cfg = load_official_yaml(REF_DIR / "config.yaml")
    assert (cfg.lr_share, cfg.wd_share) == (1e-4, 0.2)
    none = load_official_yaml(write_yaml(tmp_path, PE_RES + "  LR_SHARE: 0.0\n"))
    assert (none.lr_share, none.wd_share) == (None, None)
    with pytest.raises(ConfigError, match="CUSTOM.WD_SHARE must be >= 0"):
        load_official_yaml(write_yaml(tmp_path, PE_RES + "  WD_SHARE: -0.1\n"))
