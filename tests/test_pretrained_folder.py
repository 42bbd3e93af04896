"""The self-describing model folder: save_pretrained(model, DIR) -> create_model(DIR) with nothing else given."""
import json
from dataclasses import dataclass

import pytest
import torch

import msclip
from msclip.config import ConfigError
from msclip.errors import MissingFileError, MsclipError
from msclip.pretrained_folder import CARD_NAME, CONFIG_NAME, PREPROCESS_NAME, WEIGHTS_NAME, preprocess_spec

TINY = [m for m in msclip.list_models() if m.endswith("-tiny")]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def perturbed(name: str) -> msclip.MSCLIP:
    """A model no fresh init reproduces: every float parameter and buffer (BN statistics too) moved."""
    model = msclip.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.mul_(1 + 0.1 * torch.rand_like(b))  # stays positive
            elif b.is_floating_point():
                b.add_(0.01 * torch.randn_like(b))
    return model


def inputs(model, n=2):
    size = model.cfg.vision.image_size
    return torch.randn(n, 3, size, size), msclip.get_tokenizer(model.cfg)(["a photo of a cat", "two dogs"][:n])


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_identical_outputs(name, tmp_path):
    model = perturbed(name)
    folder = tmp_path / "model"
    msclip.save_pretrained(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, PREPROCESS_NAME, CARD_NAME])
    torch.manual_seed(123)  # a different init: equality below means the folder's weights were loaded
    other, _, preprocess = msclip.create_model_and_transforms(str(folder))
    assert other.cfg.to_dict() == model.cfg.to_dict()
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    images, tokens = inputs(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), other.encode_image(images))
        assert torch.equal(model.encode_text(tokens), other.encode_text(tokens))
    size = model.cfg.vision.image_size
    from PIL import Image
    assert preprocess(Image.new("RGB", (size + 7, size + 3))).shape == (3, size, size)
    assert json.loads((folder / PREPROCESS_NAME).read_text()) == json.loads(json.dumps(preprocess_spec(model.cfg)))
    assert msclip.get_tokenizer(folder).context_length == model.cfg.text.context_length


def test_model_card(tmp_path):
    model = msclip.create_model("msclip-s-b32-tiny")

    @dataclass
    class Optim:
        lr: float = 5e-4
        warmup_steps: int = 123

    msclip.save_pretrained(model, tmp_path / "m", recipe=Optim(), data={"train": "fashion-mnist (60000 pairs)"},
                           results={"zeroshot/fashion-mnist/top1_pct": 77.43, "note": "demo run"})
    card = (tmp_path / "m" / CARD_NAME).read_text()
    counts = model.parameter_counts()
    assert counts["shared"] and counts["image"] and counts["text"]
    for key, label in (("shared", "shared"), ("image", "image-only"), ("text", "text-only"), ("total", "total")):
        assert f"| {label} | {counts[key]:,} |" in card, label
    assert "layer 0: nothing" in card and "layers 1-5: attn_in, attn_out, mlp" in card  # what is shared, per layer
    assert "parallel conv branch" in card and "residual conv stem" in card
    assert '"warmup_steps": 123' in card and "fashion-mnist (60000 pairs)" in card
    assert "| zeroshot/fashion-mnist/top1_pct | 77.43 |" in card and '| note | "demo run" |' in card
    plain = (tmp_path / "p")
    msclip.save_pretrained(msclip.create_model("clip-b32-tiny"), plain)
    text = (plain / CARD_NAME).read_text()
    assert "nothing (each modality has its own weights)" in text and "Not recorded." in text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "clip"
    msclip.save_pretrained(msclip.create_model("clip-b32-tiny"), folder)
    return folder


def test_missing_weights_are_named(saved, tmp_path):
    """A folder with config.json but no model.safetensors is an error naming the folder and the file."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes())
    with pytest.raises(MissingFileError, match=f"{folder}.* has no {WEIGHTS_NAME}"):
        msclip.create_model(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(MissingFileError, match=f"{folder}.* has no {CONFIG_NAME}"):
        msclip.create_model(folder)


def test_a_folder_or_file_with_only_msclip_weights_loads_from_their_embedded_config(saved, tmp_path):
    """A training run's folder (model.safetensors, no config.json) and msclip's weights files themselves are
    models: create_model and resolve_checkpoint read the embedded config and load those weights; weights
    without an embedded config are an error saying what to pass."""
    from safetensors.torch import save_file

    from msclip.eval.loading import resolve_checkpoint

    ref = msclip.create_model(saved)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes())
    for spec in (folder, str(folder / WEIGHTS_NAME)):
        model = msclip.create_model(spec)
        assert model.cfg.to_dict() == {**ref.cfg.to_dict(), "name": model.cfg.name}
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
        assert resolve_checkpoint(str(spec), None) == str(folder / WEIGHTS_NAME)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(plain))
    with pytest.raises(msclip.config.ConfigError, match=r"plain\.safetensors has no embedded model config"):
        msclip.create_model(str(plain))


def test_corrupt_config_is_a_clear_error(saved, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes())
    (folder / CONFIG_NAME).write_text('{"embed_dim": 32,')
    with pytest.raises(ConfigError, match=f"{CONFIG_NAME}: not valid JSON"):
        msclip.create_model(folder)
    (folder / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        msclip.create_model(folder)


def test_unknown_config_key_is_rejected(saved, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes())
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["vision"]["patch_sise"] = 16
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unknown key 'vision.patch_sise'.*did you mean 'patch_size'"):
        msclip.create_model(folder)


def test_weights_of_another_architecture_are_rejected(saved, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    msclip.save_pretrained(msclip.create_model("msclip-b32-tiny"), tmp_path / "other")
    (folder / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes())
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(MsclipError, match="different architecture"):
        msclip.create_model(folder)


def test_registered_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    model = perturbed("clip-b32-tiny")
    monkeypatch.chdir(tmp_path)
    msclip.save_pretrained(model, "clip-b32-tiny")
    fresh = msclip.create_model("clip-b32-tiny")  # the named config, random init: not the folder
    assert not torch.equal(fresh.image.proj, model.image.proj)
    loaded = msclip.create_model("./clip-b32-tiny")
    assert torch.equal(loaded.image.proj, model.image.proj)


def test_single_file_still_works_and_has_no_card(tmp_path):
    model = perturbed("clip-b32-tiny")
    msclip.save_pretrained(model, tmp_path / "w.safetensors")
    other = msclip.create_model("clip-b32-tiny", pretrained=tmp_path / "w.safetensors")
    assert torch.equal(other.image.proj, model.image.proj)
    with pytest.raises(MsclipError, match="single weights file"):
        msclip.save_pretrained(model, tmp_path / "w2.safetensors", results={"a": 1.0})


def test_export_command_writes_a_folder(tmp_path, capsys):
    from msclip.cli import main

    assert main(["export", "--model", "msclip-b32-tiny", "--format", "folder", "--output", str(tmp_path / "f")]) == 0
    assert "wrote model folder" in capsys.readouterr().out
    model = msclip.create_model(tmp_path / "f")
    assert model.cfg.name == "msclip-b32-tiny"


def test_commands_take_a_model_folder_with_its_weights(saved, tmp_path):
    """`msclip zeroshot/index/... --model DIR` without --pretrained loads the folder's weights (not random)."""
    from msclip.eval.loading import load_model, resolve_checkpoint

    assert resolve_checkpoint(str(saved), None) == str(saved / WEIGHTS_NAME)
    assert resolve_checkpoint("clip-b32-tiny", None) is None
    ref = msclip.create_model(saved)
    got = load_model(str(saved), resolve_checkpoint(str(saved), None), torch.device("cpu"), "fp32")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes())
    with pytest.raises(MissingFileError, match="has no model.safetensors"):
        resolve_checkpoint(str(bare), None)
