"""In-training zero-shot (eval/in_training.py): the folder kind takes the class-name file and templates that
`msclip zeroshot` takes and gives its numbers; the model goes back to training mode."""
from types import SimpleNamespace as NS

import pytest
import torch

import msclip
from msclip.errors import MsclipError
from msclip.eval.in_training import REPORT_KEYS, build_zeroshot_evaluator
from msclip.eval.zeroshot_report import folder_report, plan_folder

from image_folder_utils import make_photo_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(**zs):
    z = {"kind": "folder", "path": None, "num_samples": None, "templates": None, "classnames": None,
         "batch_size": 4, **zs}
    return NS(zeroshot=NS(**z), data=NS(fashion_mnist_root=None))


def test_folder_kind_matches_msclip_zeroshot(tmp_path):
    make_photo_folder(tmp_path / "data", size=48)
    names = tmp_path / "names.txt"
    names.write_text("spacewoman\ncameraman\nkitten\nmug\nspaceship\n")
    tfile = tmp_path / "t.txt"
    tfile.write_text("a photo of a {}.\na drawing of a {}.\n")
    torch.manual_seed(0)
    model, _, tf = msclip.create_model_and_transforms("clip-b32-tiny")
    tok = msclip.get_tokenizer("clip-b32-tiny")
    ev = build_zeroshot_evaluator(_recipe(path=str(tmp_path / "data"), classnames=str(names), templates=str(tfile)),
                                  tf, tok, torch.device("cpu"), None)
    assert ev.task.classnames == ["spacewoman", "cameraman", "kitten", "mug", "spaceship"]
    model.train()
    got = ev(model)
    assert model.training and set(got) == set(REPORT_KEYS)
    rep = folder_report(model.eval(), tok, plan_folder(str(tmp_path / "data"), str(names), str(tfile)),
                        torch.device("cpu"), model_spec="clip-b32-tiny", checkpoint=None, precision="fp32")
    assert got == {k: rep[k] for k in ("top1_pct", "top5_pct", "mean_per_class_recall_pct")} | \
        {"images": rep["images_scored"]}
    # a list of format strings works too; the default set is the four generic prompts
    ev_list = build_zeroshot_evaluator(_recipe(path=str(tmp_path / "data"), templates=["a {} photo."]), tf, tok,
                                       torch.device("cpu"), None)
    assert ev_list.task.templates.templates == ("a {} photo.",)
    ev_default = build_zeroshot_evaluator(_recipe(path=str(tmp_path / "data")), tf, tok, torch.device("cpu"), None)
    assert ev_default.task.templates.name == "generic" and ev_default.task.classnames[1] == "camera man"


def test_no_kind_means_no_evaluator_and_folder_needs_a_path(tmp_path):
    assert build_zeroshot_evaluator(_recipe(kind=None), None, None, torch.device("cpu"), None) is None
    with pytest.raises(MsclipError, match="zeroshot.path"):
        build_zeroshot_evaluator(_recipe(), None, None, torch.device("cpu"), None)
