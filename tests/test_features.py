"""The shared feature loops (eval/features.py): texts keep their order across chunks and length-sorted batches;
images are skipped and counted, never silently; an all-unreadable set is an error unless allowed."""
import pytest
import torch

import msclip
from msclip.eval.features import SafeDataset, extract_image_features, extract_text_features

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a cat", "", "a very " + "long " * 30 + "caption", "two words", "x", "a photo of a dog on the grass"]


def test_text_loop_keeps_input_order_across_chunks_and_batches():
    torch.manual_seed(0)
    model = msclip.create_model("clip-b32-tiny").eval()
    tok = msclip.get_tokenizer("clip-b32-tiny")
    with torch.no_grad():
        ref = model.encode_text(tok(TEXTS), normalize=True, trim=False)
    got = extract_text_features(model, tok, TEXTS, "cpu", batch_size=2, chunk=4, progress=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not got.is_inference()  # usable by autograd code (the trainer's evaluator, linear probes)


class _Items:
    def __init__(self, bad: set[int], n: int = 7):
        self.bad, self.n = bad, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"item {i} is unreadable")
        return torch.full((2,), float(i)), i % 3


def test_image_loop_skips_and_counts():
    out = extract_image_features(lambda x: x * 2, SafeDataset(_Items({1, 5}), lambda x: x), "cpu", batch_size=3,
                                 progress=False)
    assert out["indices"].tolist() == [0, 2, 3, 4, 6] and out["labels"].tolist() == [0, 2, 0, 1, 0]
    assert out["features"][:, 0].tolist() == [0.0, 4.0, 6.0, 8.0, 12.0]
    assert out["skipped"] == 2 and [i for i, _ in out["failures"]] == [1, 5]
    assert "item 5 is unreadable" in out["failures"][1][1]
    with pytest.raises(ValueError, match="no image could be read"):
        extract_image_features(lambda x: x, SafeDataset(_Items(set(range(3)), 3), lambda x: x), "cpu",
                               progress=False)
    empty = extract_image_features(lambda x: x, SafeDataset(_Items(set(range(3)), 3), lambda x: x), "cpu",
                                   progress=False, allow_empty=True)
    assert empty["skipped"] == 3 and len(empty["indices"]) == 0
