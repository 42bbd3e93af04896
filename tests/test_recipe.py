"""Recipes and the strict loader: every problem reported at once, every value validated before a run folder
exists, the data section is the pipeline's DataSpec, official yamls' LR_SHARE / WD_SHARE reach the optimiser."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import msclip
from msclip.config import ConfigError, ModelCfg
from msclip.data import DataSpec
from msclip.errors import MsclipError
from msclip.train import train as train_entry
from msclip.train.optim import param_groups
from msclip.train.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, save_recipe
from msclip.typed_config import TypedConfigError, from_dict, set_dotted

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_TINY = REPO / "tests" / "data" / "official_tiny" / "config.yaml"


# --- the loader ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inner:
    size: int = 1
    names: list[str] | None = None


@dataclasses.dataclass
class Outer:
    rate: float = 0.5
    pair: tuple[float, float] = (0.0, 1.0)
    spec: str | list[str] | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)
    many: list[Inner] = dataclasses.field(default_factory=list)
    flag: bool = False


def test_loader_types_nested_tuples_unions():
    obj = from_dict(Outer, {"rate": "1e-3", "pair": [2, 3], "spec": ["a", "b"], "inner": {"names": ["x"]},
                            "many": [{"size": 4}], "flag": True})
    assert obj.rate == 1e-3 and obj.pair == (2.0, 3.0) and obj.spec == ["a", "b"]
    assert obj.inner == Inner(1, ["x"]) and obj.many == [Inner(4)] and obj.flag is True
    assert from_dict(Outer, {"spec": "simple"}).spec == "simple"


def test_loader_reports_every_problem_at_once():
    data = {"rat": 1, "pair": [1], "inner": {"siz": 2, "size": "big"}, "many": [{"sizes": 1}], "flag": "yes"}
    with pytest.raises(TypedConfigError) as info:
        from_dict(Outer, data, source="f.yaml")
    msg = str(info.value)
    assert msg.startswith("6 problems in f.yaml")
    for needle in ("unknown key 'rat' in f.yaml (did you mean 'rate'?)", "pair: expected 2 values",
                   "unknown key 'inner.siz' in f.yaml (did you mean 'size'?)", "inner.size: expected an integer",
                   "unknown key 'many[0].sizes'", "flag: expected true/false, got 'yes'"):
        assert needle in msg
    assert issubclass(TypedConfigError, MsclipError)


def test_strings_are_parsed_by_type_only_from_the_command_line():
    obj = Outer()
    set_dotted(obj, [("rate", "0.25"), ("pair", "[1, 2]"), ("inner.size", "7"), ("flag", "on"), ("spec", "null")])
    assert (obj.rate, obj.pair, obj.inner.size, obj.flag, obj.spec) == (0.25, (1.0, 2.0), 7, True, None)
    set_dotted(obj, [("spec", "a,b")])
    assert obj.spec == "a,b"  # a string field takes the string; a list needs [..]
    set_dotted(obj, [("spec", '["a {}", "b {}"]'), ("inner.names", "x,y")])
    assert obj.spec == ["a {}", "b {}"] and obj.inner.names == ["x", "y"]
    with pytest.raises(TypedConfigError, match="expected an integer"):
        from_dict(Outer, {"inner": {"size": "7"}})  # a file's "7" is a string, not an int
    before = dataclasses.asdict(obj)
    with pytest.raises(TypedConfigError, match="2 problems"):
        set_dotted(obj, [("rate", "2"), ("inner.nope", "1"), ("flag", "maybe")])
    assert dataclasses.asdict(obj) == before  # nothing applied when anything is wrong


def test_model_config_reports_every_bad_key():
    d = msclip.get_model_config("msclip-s-b32-tiny").to_dict()
    d["vision"]["widht"] = 64
    d["text"]["layers"] = "twelve"
    d["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        ModelCfg.from_dict(d, source="m.json")
    msg = str(info.value)
    assert "3 problems" in msg and "did you mean 'width'" in msg and "text.layers: expected an integer" in msg
    assert isinstance(info.value, MsclipError)


# --- recipes ---------------------------------------------------------------------------------------------

def test_file_and_override_problems_reported_together(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: clip-b32-tiny\noptim:\n  lrr: 0.1\ntrain:\n  steps: 3\n  lr: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["log.everyy=3", "train.threads=x"])
    msg = str(info.value)
    assert "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg  # train.lr: the field of another section
    assert "'log.everyy'" in msg and "train.threads: expected an integer" in msg


BAD_VALUES = {
    "train.steps": ("0", "must be > 0"), "log.every": ("0", "must be > 0"),
    "optim.weight_decay": ("-0.1", "must be >= 0"), "optim.weight_decay_shared": ("-1", "must be >= 0"),
    "train.grad_clip_norm": ("0", "must be > 0"), "train.threads": ("0", "must be >= 1"),
    "data.kind": ("parquet", "unknown data kind"), "data.batch_size": ("0", "must be >= 1"),
    "data.workers": ("-1", "must be >= 0"), "data.shuffle_buffer": ("-5", "must be >= 0"),
    "train.accum_freq": ("0", "must be >= 1"), "checkpoint.every": ("-1", "must be >= 0"),
    "checkpoint.keep_last": ("0", "must be >= 1"), "zeroshot.kind": ("imagenet", "is not one of"),
    "model": ("no-such-model", "unknown model"), "train.precision": ("fp8", "is not one of"),
    "train.loss": ("infonce", "is not one of clip, siglip"),
    "train.compile": ("graph", "is not one of off, model, step"),
    "train.compile_backend": ("cudagraphs", "is not one of inductor, aot_eager, eager"),
}


def test_validate_names_every_bad_field_at_once():
    overrides = [f"{k}={v}" for k, (v, _) in BAD_VALUES.items()]
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    lines = str(info.value).splitlines()
    assert lines[0] == f"recipe: {len(BAD_VALUES)} problems:"
    for key, (value, why) in BAD_VALUES.items():
        assert any(line.startswith(f"  - {key}=") and why in line for line in lines), (key, lines)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_each_bad_value_alone_is_refused(key):
    value, why = BAD_VALUES[key]
    extra = [] if key == "train.steps" else ["train.steps=1"]
    with pytest.raises(RecipeError, match=why):
        load_recipe(None, extra + [f"{key}={value}"])


def test_steps_and_epochs_exactly_one():
    with pytest.raises(RecipeError, match="exactly one of train.steps and train.epochs"):
        load_recipe(None, [])
    with pytest.raises(RecipeError, match="exactly one"):
        load_recipe(None, ["train.steps=2", "train.epochs=1"])
    with pytest.raises(RecipeError, match="train.epochs=-1.0: must be > 0"):
        load_recipe(None, ["train.epochs=-1"])
    assert load_recipe(None, ["train.epochs=0.5"]).train.epochs == 0.5


def test_train_validates_before_creating_the_run_folder(tmp_path):
    recipe = Recipe(output_dir=str(tmp_path / "runs"), name="x")
    recipe.train.steps = 2
    recipe.log.every = 0
    with pytest.raises(RecipeError, match="log.every=0"):
        train_entry(recipe)
    assert not (tmp_path / "runs").exists()


def test_zeroshot_fields(tmp_path):
    (tmp_path / "cls").mkdir()
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    r = load_recipe(None, ["train.steps=1", "zeroshot.kind=folder", f"zeroshot.path={tmp_path / 'cls'}",
                           f"zeroshot.classnames={names}", "zeroshot.templates=simple"])
    assert r.zeroshot.classnames == str(names) and r.zeroshot.templates == "simple"
    r = load_recipe(None, ["train.steps=1", "zeroshot.kind=fashion_mnist", 'zeroshot.templates=["a {}."]'])
    assert r.zeroshot.templates == ["a {}."]
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["train.steps=1", "zeroshot.kind=folder", f"zeroshot.classnames={tmp_path / 'no.txt'}",
                           "zeroshot.templates=[no placeholder]"])
    msg = str(info.value)
    assert "zeroshot.path=None" in msg and "no.txt" in msg and "has no '{}'" in msg
    with pytest.raises(RecipeError, match="zeroshot.templates='nosuchset'"):
        load_recipe(None, ["train.steps=1", "zeroshot.kind=fashion_mnist", "zeroshot.templates=nosuchset"])


def test_data_section_is_the_data_spec_and_round_trips(tmp_path):
    assert Recipe().data.__class__ is DataSpec
    r = load_recipe(None, ["train.steps=1", "data.shuffle_buffer=0", "data.batch_size=4", "data.workers=0"])
    assert isinstance(r.data, DataSpec) and r.data.shuffle_buffer == 0 and r.data.batch_size == 4
    save_recipe(r, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == r


# --- official yamls --------------------------------------------------------------------------------------

def test_official_yaml_sets_shared_lr_and_wd():
    r = recipe_from_dict({"model": str(OFFICIAL_TINY), "train": {"steps": 1}}, source="test")
    assert (r.optim.lr_shared, r.optim.weight_decay_shared) == (1e-4, 0.2)  # CUSTOM.LR_SHARE / WD_SHARE
    model = msclip.create_model(str(OFFICIAL_TINY))
    groups = {g["name"]: g for g in param_groups(model, r.optim)}
    assert groups["shared_decay"]["lr"] == 1e-4 and groups["shared_decay"]["weight_decay"] == 0.2
    assert groups["decay"]["lr"] == r.optim.lr and groups["decay"]["weight_decay"] == r.optim.weight_decay
    mine = recipe_from_dict({"model": str(OFFICIAL_TINY), "train": {"steps": 1},
                             "optim": {"lr_shared": 3e-3, "weight_decay_shared": 0.0}}, source="test")
    assert (mine.optim.lr_shared, mine.optim.weight_decay_shared) == (3e-3, 0.0)  # the recipe wins
    named = recipe_from_dict({"model": "msclip-s-b32-tiny", "train": {"steps": 1}}, source="test")
    assert named.optim.lr_shared is None and named.optim.weight_decay_shared is None


def test_official_zero_lr_share_means_unset(tmp_path):
    text = OFFICIAL_TINY.read_text().replace("LR_SHARE: 0.0001", "LR_SHARE: 0.0").replace("WD_SHARE: 0.2",
                                                                                            "WD_SHARE: 0.0")
    path = tmp_path / "zero.yaml"
    path.write_text(text)
    r = recipe_from_dict({"model": str(path), "train": {"steps": 1}}, source="test")
    assert r.optim.lr_shared is None  # 0 = unset: the shared groups take optim.lr
    assert r.optim.weight_decay_shared == 0.0  # a written WD_SHARE is used, 0 included


# --- docs/training.md ------------------------------------------------------------------------------------

def test_training_doc_lists_every_recipe_field_with_its_default():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_table", REPO / "scripts" / "recipe_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    doc = (REPO / "docs" / "training.md").read_text()
    from msclip.train.recipe import field_paths

    for path in field_paths():
        assert f"| `{path}` |" in doc, f"docs/training.md does not list recipe field {path}"
    assert table.current_block(doc) == table.table(), \
        "docs/training.md's field table is stale: run python scripts/recipe_table.py --write"
    assert all(note for *_, note in table.rows()), "every recipe field needs a comment saying its values"


def test_speed_and_loss_fields_are_typed_and_round_trip(tmp_path):
    r = load_recipe(None, ["train.steps=1", "train.loss=siglip", "train.siglip_bias_init=-5", "train.compile=model",
                           "train.compile_backend=aot_eager", "train.channels_last=true", "train.tf32=false"])
    t = r.train
    assert (t.loss, t.siglip_bias_init, t.compile, t.compile_backend, t.channels_last, t.tf32) == \
        ("siglip", -5.0, "model", "aot_eager", True, False)
    defaults = load_recipe(None, ["train.steps=1"]).train
    assert (defaults.loss, defaults.compile, defaults.channels_last, defaults.tf32) == ("clip", "off", False, True)
    with pytest.raises(RecipeError, match="train.channels_last: expected"):
        load_recipe(None, ["train.steps=1", "train.channels_last=maybe"])
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml").to_dict() == r.to_dict()


@pytest.mark.parametrize("text,message", [("a: [1, 2", "invalid YAML"), ("- 1\n- 2\n", "mapping of fields, got list")])
def test_every_yaml_reader_names_the_file_and_the_problem(tmp_path, text, message) -> None:
    """Recipes, study files and official model yamls are read by one reader (typed_config.read_yaml_mapping)."""
    from msclip.config import ConfigError
    from msclip.official_config import load_official_yaml
    from msclip.study.spec import StudyError, load_study

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    for load, err in ((load_recipe, RecipeError), (load_study, StudyError), (load_official_yaml, ConfigError)):
        with pytest.raises(err, match=f"{bad}: .*{message}"):
            load(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
