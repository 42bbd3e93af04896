"""Audit of config, checkpoint and file-writing promises that the other tests left unchecked: strict types,
values that validation must refuse, weights_only train-state loading, atomic saves of every weights writer,
official-yaml details, resume selection and run-folder hygiene. Small data made in tmp_path, no training."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import msclip
from msclip.checkpoint import CheckpointError, convert_state_dict, load_state_dict_file, save_pretrained
from msclip.config import ConfigError, ModelCfg
from msclip.convert import to_official
from msclip.errors import MsclipError
from msclip.io import WriteError
from msclip.official_config import load_official_yaml
from msclip.pretrained_folder import CONFIG_NAME
from msclip.train.recipe import Recipe, RecipeError, load_recipe
from msclip.train.run_folder import clear_previous_run, reuse_problem
from msclip.train.state import (TrainStateError, list_checkpoints, load_resume_state, load_train_state,
                                save_train_state)
from msclip.typed_config import TypedConfigError, from_dict, update_from_dict

TINY = "clip-b32-tiny"


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def tiny() -> msclip.MSCLIP:
    return msclip.create_model(TINY)


# --- strict typed loading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Typed:
    count: int = 1
    rate: float = 0.5
    label: str = "x"


@pytest.mark.parametrize("key", ["count", "rate", "label"])
def test_a_boolean_is_not_a_number_or_a_string(key: str) -> None:
    # YAML `true` for an int/float/str field is a typo, not 1 / 1.0 / "True"
    with pytest.raises(TypedConfigError, match=rf"f\.yaml: {key}: expected .*got True"):
        from_dict(Typed, {key: True}, source="f.yaml")


def test_update_from_dict_changes_nothing_on_a_problem() -> None:
    obj = Typed()
    with pytest.raises(TypedConfigError, match="2 problems"):
        update_from_dict(obj, {"count": 5, "rate": "fast", "nope": 1}, source="r.yaml")
    assert obj == Typed()  # the good key 'count' was not applied either


# --- model config values ----------------------------------------------------------------------------------

def _tiny_dict(**top: Any) -> dict:
    return {**msclip.get_model_config("msclip-b32-tiny").to_dict(), **top}


def test_zero_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"m\.json: embed_dim must be a positive integer, got 0"):
        ModelCfg.from_dict(_tiny_dict(embed_dim=0), source="m.json")


def test_unknown_resize_mode_is_refused() -> None:
    d = _tiny_dict()
    d["preprocess"]["resize_mode"] = "stretch"
    with pytest.raises(ConfigError, match="resize_mode.*'stretch'"):
        ModelCfg.from_dict(d)


# --- recipe values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("optim.betas=[0.9, 1.0]", "optim.betas="),  # beta2 = 1 never forgets: AdamW needs [0, 1)
    ("train.max_nonfinite=0", "train.max_nonfinite=0"),
    ("resume=latest", "resume='latest': needs a fixed run name"),
])
def test_more_bad_recipe_values(override: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_recipe(None, ["train.steps=1", f"model={TINY}", override])


# --- weights_only and clear errors ------------------------------------------------------------------------

class _Payload:
    """Unpickling it creates a folder: visible proof that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (self.marker,))


def test_train_state_loading_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "optimizer": {}, "evil": _Payload(marker)}, path)
    with pytest.raises(TrainStateError, match=r"step_00000001\.pt: unreadable"):
        load_train_state(path)
    assert not marker.exists()


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path, tiny: msclip.MSCLIP) -> None:
    save_pretrained(tiny, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_state_dict_file(tmp_path / "cut.safetensors")


def test_openai_metadata_keys_are_ignored(tiny: msclip.MSCLIP) -> None:
    # OpenAI JIT checkpoints carry these scalars next to the weights; they are not unexpected keys
    state = dict(to_official(tiny.state_dict(), tiny.cfg))
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408), attn_mask=torch.zeros(77, 77))
    converted = convert_state_dict(state, tiny)
    assert set(converted) == set(tiny.state_dict())


# --- atomic saves: a crash mid-write never damages the file under the final name ---------------------------

def _failing_writer(target_bytes: bytes = b"PK\x03\x04half") -> Any:
    """A stand-in for torch.save / safetensors' save_file that dies half-way through its file."""
    def write(obj: Any, dest: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(dest, "write"):  # torch_save hands torch.save a file object
            dest.write(target_bytes)
        else:
            Path(dest).write_bytes(target_bytes)  # half a file, then the process "dies"
        raise RuntimeError("simulated crash in the middle of a write")
    return write


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_failed_weights_save_keeps_the_old_file(tmp_path: Path, tiny: msclip.MSCLIP, suffix: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"w{suffix}"
    save_pretrained(tiny, path)
    before = path.read_bytes()
    import safetensors.torch

    monkeypatch.setattr(torch, "save", _failing_writer())
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer())
    with pytest.raises(WriteError, match=rf"cannot write .*{path.name}"):
        save_pretrained(tiny, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_train_state_save_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "step_00000001.pt"
    save_train_state(path, {"step": 1, "optimizer": {}}, keep_last=0)
    monkeypatch.setattr(torch, "save", _failing_writer())
    with pytest.raises(WriteError, match=path.name):
        save_train_state(path, {"step": 2, "optimizer": {}}, keep_last=0)
    assert load_train_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_model_folder_gets_its_config_only_when_complete(tmp_path: Path, tiny: msclip.MSCLIP,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import msclip.pretrained_folder as pf

    def broken_card(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("crash after the weights were written")
    monkeypatch.setattr(pf, "model_card", broken_card)
    with pytest.raises(RuntimeError):
        msclip.save_pretrained(tiny, tmp_path / "m")
    assert not (tmp_path / "m" / CONFIG_NAME).exists()  # so the half folder is not taken for a model


def test_saving_a_folder_over_a_file_is_refused(tmp_path: Path, tiny: msclip.MSCLIP) -> None:
    path = tmp_path / "model"
    path.write_text("a user's file")
    with pytest.raises(MsclipError, match="exists and is not a folder"):
        msclip.save_pretrained(tiny, path)
    assert path.read_text() == "a user's file"


# --- official yamls ---------------------------------------------------------------------------------------

def test_base_files_that_include_each_other_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("BASE: ['b.yaml']\nMODEL:\n  NAME: clip_openai\n")
    (tmp_path / "b.yaml").write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_official_yaml(tmp_path / "a.yaml")


def test_official_input_mean_std_and_eps(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("MODEL:\n  NAME: clip_openai\nINPUT:\n  MEAN: [0.5, 0.5, 0.5]\n  STD: [0.25, 0.25, 0.25]\n")
    cfg = load_official_yaml(path).model_cfg
    assert tuple(cfg.preprocess.mean) == (0.5, 0.5, 0.5) and tuple(cfg.preprocess.std) == (0.25, 0.25, 0.25)
    assert cfg.norm_eps == 1e-12  # the official LayerNorm epsilon


# --- resume picks the newest complete, usable checkpoint ------------------------------------------------

def _state(step: int, value: float) -> dict:
    return {"step": step, "optimizer": {}, "model": {"w": torch.full((2,), value)}}


def test_list_checkpoints_ignores_temporaries_and_other_files(tmp_path: Path) -> None:
    for step in (3, 12):
        save_train_state(tmp_path / f"step_{step:08d}.pt", _state(step, 1.0), keep_last=0)
    (tmp_path / ".msclip-tmp-step_00000020.pt.ab12").write_bytes(b"half")  # a killed save
    (tmp_path / "step_00000030.pt.bak").write_bytes(b"a copy")
    (tmp_path / "old-step_00000040.pt").write_bytes(b"another")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 12]


def test_a_non_finite_newest_checkpoint_is_skipped_on_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    save_train_state(folder / "step_00000001.pt", _state(1, 1.0), keep_last=0)
    save_train_state(folder / "step_00000002.pt", _state(2, float("nan")), keep_last=0)
    with pytest.raises(TrainStateError, match=r"step_00000002\.pt: 1 weight tensor\(s\) are non-finite"):
        load_train_state(folder / "step_00000002.pt")
    path, state = load_resume_state("latest", tmp_path / "run")
    assert path.name == "step_00000001.pt" and state["step"] == 1


# --- run folders ------------------------------------------------------------------------------------------

def test_a_folder_holding_only_exported_weights_is_an_earlier_run(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert "model.safetensors" in reuse_problem(Recipe(), tmp_path)


def test_overwrite_removes_the_earlier_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    (tmp_path / "metrics-train.csv").write_text("step\n1\n")
    (tmp_path / "notes.txt").write_text("the user's")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_of_a_killed_runs_folder_with_a_cut_metrics_line(tmp_path: Path, caplog) -> None:
    """A kill -9 can cut metrics.jsonl inside a record: --overwrite still clears the folder (every metrics CSV,
    whatever kinds the JSONL still names, and the TensorBoard events) instead of failing on the cut line."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + '\n{"kind": "zerosh')
    (tmp_path / "metrics-train.csv").write_text("step\n1\n")
    (tmp_path / "metrics-zeroshot.csv").write_text("step\n1\n")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        clear_previous_run(tmp_path)
    assert list(tmp_path.iterdir()) == [] and "overwrite: removed" in caplog.text


def test_overwrite_of_an_empty_folder_says_nothing(tmp_path: Path, caplog) -> None:
    """--overwrite on a folder with nothing of an earlier run removes nothing and does not claim it did."""
    with caplog.at_level(logging.WARNING):
        clear_previous_run(tmp_path)
    assert "overwrite" not in caplog.text


def test_an_explicit_damaged_checkpoint_is_not_replaced_by_an_older_one(tmp_path: Path) -> None:
    # resume=PATH names one file: a damaged one is an error, never a silent switch to its neighbour
    save_train_state(tmp_path / "step_00000001.pt", _state(1, 1.0), keep_last=0)
    bad = tmp_path / "step_00000002.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrainStateError, match=rf"^{bad}: unreadable"):
        load_resume_state(str(bad), tmp_path / "run")


# --- real bugs found by the audit (strict xfail: they start failing once fixed) ----------------------------

@pytest.mark.parametrize("override", ["optim.lr=nan", "train.grad_clip_norm=nan", "optim.eps=nan", "optim.lr=inf",
                                      "optim.eps=.nan"])  # NaN passes every range check (NaN <= 0 is False)
def test_nan_recipe_values_are_refused(override: str) -> None:
    with pytest.raises(RecipeError, match=override.split("=")[0]):
        load_recipe(None, ["train.steps=1", f"model={TINY}", override])


def test_a_json_config_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"m\.json"):
        ModelCfg.from_json(path)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    (tmp_path / "step_00000004.pt").write_bytes(b"PK\x03\x04 truncated")  # skipped by the resume fallback
    path = save_train_state(tmp_path / "step_00000003.pt", _state(3, 1.0), keep_last=1)
    assert load_train_state(path)["step"] == 3


def test_every_unknown_official_key_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("MODEL:\n  NAME: clip_openai\n  SPEC:\n    VISION:\n      WIDTHH: 1\n      LAYERZ: 2\nBOGUS: 1\n")
    with pytest.raises(ConfigError) as info:
        load_official_yaml(path)
    assert all(key in str(info.value) for key in ("WIDTHH", "LAYERZ", "BOGUS"))


def test_unknown_custom_and_section_keys_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("MODEL:\n  NAME: clip_openai\n  SPEC:\n    TEXT:\n      WIDHT: 1\nCUSTOM:\n  EARLY_CONVV: true\n")
    with pytest.raises(ConfigError) as info:
        load_official_yaml(path)
    assert "MODEL.SPEC.TEXT.WIDHT" in str(info.value) and "CUSTOM.EARLY_CONVV" in str(info.value)


def test_a_single_base_file_may_be_given_as_a_string(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("MODEL:\n  NAME: clip_openai\n  SPEC:\n    EMBED_DIM: 24\n")
    (tmp_path / "m.yaml").write_text("BASE: base.yaml\n")
    assert load_official_yaml(tmp_path / "m.yaml").model_cfg.embed_dim == 24


def test_a_non_numeric_drop_path_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("MODEL:\n  NAME: clip_openai\n  SPEC:\n    VISION:\n      DROP_PATH: lots\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: MODEL\.SPEC\.VISION\.DROP_PATH='lots'"):
        load_official_yaml(path)
