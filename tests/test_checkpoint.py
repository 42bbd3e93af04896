"""Checkpoint I/O: official round trip, strict and clear errors, safetensors, msclip format."""
import os

import pytest
import torch

import msclip
from msclip.checkpoint import (CheckpointError, convert_state_dict, load_pretrained, load_state_dict_file,
                               save_official, save_pretrained)
from msclip.convert import CheckpointMismatch, from_official, to_official

NAME = "msclip-s-b32-tiny"


@pytest.fixture()
def model():
    return msclip.create_model(NAME)


def test_official_round_trip_exact(model, tmp_path):
    save_official(model, tmp_path / "official.pth")
    other = msclip.create_model(NAME, pretrained=tmp_path / "official.pth")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    again = to_official(other.state_dict(), other.cfg)
    first = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_alias_disagreement_is_an_error(model):
    official = {k: v.clone() for k, v in to_official(model.state_dict(), model.cfg).items()}
    official["transformer.resblocks.3.mlp.c_fc.weight"] += 1
    with pytest.raises(CheckpointMismatch, match="disagree"):
        from_official(official, model.state_dict(), model.cfg)


def test_missing_unexpected_and_shape_listed_together(model):
    official = dict(to_official(model.state_dict(), model.cfg))
    del official["visual.proj"]
    official["visual.extra"] = torch.zeros(1)
    official["ln_final.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatch) as err:
        from_official(official, model.state_dict(), model.cfg)
    msg = str(err.value)
    assert "visual.proj" in msg and "visual.extra" in msg and "ln_final.weight" in msg and "(7,)" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_msclip_format_round_trip(model, tmp_path, suffix):
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    save_pretrained(model, tmp_path / f"m{suffix}")
    other = msclip.create_model(NAME, pretrained=tmp_path / f"m{suffix}")
    assert other.logit_scale.item() == 3.0
    state, config = load_state_dict_file(tmp_path / f"m{suffix}")
    assert config["name"] == NAME and set(state) == set(model.state_dict())


def test_config_mismatch_is_an_error(model, tmp_path):
    save_pretrained(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointMismatch, match="different architecture"):
        msclip.create_model("msclip-s-b16-tiny", pretrained=tmp_path / "m.safetensors")


def test_truncated_file_is_a_clear_error(model, tmp_path):
    save_pretrained(model, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_pretrained(model, tmp_path / "cut.pt")


@pytest.mark.parametrize("obj", [[1, 2, 3], {"a": 1, "b": "x"}, {}])
def test_non_tensor_checkpoint_is_a_clear_error(model, tmp_path, obj):
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_pretrained(model, tmp_path / "bad.pt")


def test_missing_file(model):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_pretrained(model, "nowhere.pt")


@pytest.mark.parametrize("wrapper,prefix", [("state_dict", "module."), ("model", "_orig_mod."),
                                            (None, "module._orig_mod.")])
def test_wrapped_and_prefixed_state_dicts(model, tmp_path, wrapper, prefix):
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    torch.save(state if wrapper is None else {wrapper: state}, tmp_path / "ddp.pt")
    torch.manual_seed(1)  # a different init, so equality below means the weights were loaded
    other = msclip.create_model(NAME)
    assert not torch.equal(other.image.proj, model.image.proj)
    load_pretrained(other, tmp_path / "ddp.pt")
    theirs = other.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(theirs[k], v), k


def test_msclip_keys_strict(model):
    state = dict(model.state_dict())
    state.pop("logit_scale")
    with pytest.raises(CheckpointMismatch, match="logit_scale"):
        convert_state_dict(state, model)


def test_loading_uses_weights_only(model, tmp_path):
    marker = tmp_path / "payload-ran"

    class Evil:
        def __reduce__(self):  # unpickling calls os.mkdir(marker): visible proof that code ran
            return (os.mkdir, (str(marker),))

    state = dict(model.state_dict())
    state["x"] = Evil()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_pretrained(model, tmp_path / "evil.pt")
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"


def test_both_layouts_report_mismatches_alike(model):
    """The msclip-layout and official-layout checks list problems in the same format, every one at once."""
    own = dict(model.state_dict())
    own.pop("logit_scale")
    own["extra"] = torch.zeros(1)
    own["image.proj"] = torch.zeros(3)
    official = dict(to_official(model.state_dict(), model.cfg))
    official.pop("logit_scale")
    official["extra"] = torch.zeros(1)
    official["visual.proj"] = torch.zeros(3)
    messages = []
    for state in (own, official):
        with pytest.raises(CheckpointMismatch) as err:
            convert_state_dict(state, model, source="ckpt.pt")
        messages.append(str(err.value))
    for msg, proj in zip(messages, ("image.proj", "visual.proj")):
        assert msg.startswith(f"ckpt.pt does not fit model {NAME}:\n")
        assert "  missing keys (1):\n    logit_scale" in msg
        assert "  unexpected keys (1):\n    extra" in msg
        assert f"  wrong shapes or types (1):\n    {proj}: checkpoint (3,) vs model (64, 32)" in msg


def test_checkpoint_errors_are_user_errors():
    from msclip.errors import MsclipError

    assert issubclass(CheckpointError, MsclipError) and issubclass(CheckpointMismatch, MsclipError)
