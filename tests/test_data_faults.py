"""Data faults and exact replay: an epoch's batches are a pure function of (seed, epoch, position), and
every skipped sample, damaged shard and dropped remainder is counted once in ``info.stats``."""
from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from shard_utils import write_tar
from byte_tokenizer import byte_tokenize as tokenize, decode
from msclip.data import COUNT_FIELDS, DataSpec, build_train_data
from msclip.data.wds import NoUsableSamples, count_samples

# random augmentation, so a replay only matches when the augmentation RNG is reproduced
AUGMENT = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def shape_png(i: int) -> bytes:
    """A small drawn scene (shape, colour and position vary), so crops and flips change pixels."""
    img = Image.new("RGB", (40, 32), (20 + 7 * i % 200, 90, 160))
    draw = ImageDraw.Draw(img)
    x = 4 + (i * 5) % 20
    [draw.ellipse, draw.rectangle][i % 2]((x, 6, x + 14, 24), fill=(240, (40 * i) % 256, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def good_shards(root: Path, n_shards: int = 4, per_shard: int = 6) -> str:
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            members += [(f"{s}{i:03d}.png", shape_png(s * per_shard + i)), (f"{s}{i:03d}.txt", f"s{s} i{i}".encode())]
        write_tar(root / f"shard-{s}.tar", members)
    return f"{root}/shard-{{0..{n_shards - 1}}}.tar"


def good_csv(root: Path, n: int = 18) -> str:
    (root / "img").mkdir()
    lines = ["filepath,title"]
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(shape_png(i))
        lines.append(f"img/{i}.png,caption {i}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(root / "pairs.csv")


def build(spec: DataSpec, workers: int, **kw):
    return build_train_data(spec, image_transform=AUGMENT, tokenizer=tokenize, batch_size=3, workers=workers,
                            seed=5, **kw)


def epoch_batches(info, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the trainer does (train/loop.py): set the epoch, iterate the loader, skip ``skip`` batches on
    a mid-epoch resume, take at most the epoch's batches with islice."""
    info.set_epoch(epoch)
    it = iter(info.loader)
    for _ in range(skip):
        next(it)
    return list(itertools.islice(it, info.num_batches - skip))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (img_a, tok_a), (img_b, tok_b) in zip(a, b):
        assert torch.equal(tok_a, tok_b)
        assert torch.equal(img_a, img_b)


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_epoch_two_replays_exactly_in_a_fresh_loader(tmp_path: Path, kind: str) -> None:
    path = good_csv(tmp_path) if kind == "csv" else good_shards(tmp_path)
    spec = DataSpec(kind, path=path, shuffle_buffer=4)
    long_run = build(spec, workers=2)  # persistent workers live through epochs 0 and 1
    epochs = [epoch_batches(long_run, e) for e in range(3)]
    assert not torch.equal(epochs[1][0][0], epochs[2][0][0])  # epochs differ: the replay below is not trivial
    torch.manual_seed(1234)  # a resumed process's RNG is whatever it restored; the data must not care
    resumed = build(spec, workers=2)
    assert_same(epoch_batches(resumed, 2), epochs[2])
    mid = build(spec, workers=2)  # resumed in the middle of epoch 2 (trainer skips the done batches)
    assert_same(epoch_batches(mid, 2, skip=3), epochs[2][3:])


def test_loading_leaves_the_trainer_rng_alone(tmp_path: Path) -> None:
    spec = DataSpec("csv", path=good_csv(tmp_path))
    info = build(spec, workers=0)
    torch.manual_seed(0)
    epoch_batches(info, 0)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


# --- faults ------------------------------------------------------------------------------------------------
def faulty_shards(root: Path) -> tuple[str, set[str], dict[str, int]]:
    """Four shards: injected sample faults, a tar cut at a member boundary and one cut inside a member.
    Returns (path, the captions that must arrive, the expected counts)."""
    good: set[str] = set()

    def sample(s: int, i: int, kind: str) -> list[tuple[str, bytes]]:
        key, cap = f"{s}{i:03d}", f"s{s} i{i}"
        img = (f"{key}.jpg", b"\xff\xd8 not a jpeg") if kind == "undecodable" else (f"{key}.png", shape_png(i))
        if kind == "ok":
            good.add(cap)
        txt = {"ok": cap.encode(), "undecodable": cap.encode(), "empty": b"  \n", "latin1": "caf\xe9".encode("latin-1")}
        return [img] + ([(f"{key}.txt", txt[kind])] if kind != "missing" else [])

    kinds = ["ok", "undecodable", "ok", "missing", "ok", "empty", "ok", "latin1", "ok"]
    write_tar(root / "shard-0.tar", [m for i, k in enumerate(kinds) for m in sample(0, i, k)])
    write_tar(root / "shard-1.tar", [m for i in range(8) for m in sample(1, i, "ok")])
    for s in (2, 3):  # cut after 4 of 8 samples: at the next header, and inside the next image
        members = [m for i in range(8) for m in sample(s, i, "ok")]
        write_tar(root / f"shard-{s}.tar", members)
        with tarfile.open(root / f"shard-{s}.tar") as tar:
            nxt = tar.getmember(f"{s}004.png")
            cut = nxt.offset if s == 2 else nxt.offset_data + 20
        data = (root / f"shard-{s}.tar").read_bytes()[:cut]
        (root / f"shard-{s}.tar").write_bytes(data)
        good -= {f"s{s} i{i}" for i in range(4, 8)}
    counts = {"skipped_decode": 1, "missing_caption": 1, "empty_caption": 1, "bad_encoding": 1,
              "truncated_shards": 2}
    return f"{root}/shard-{{0..3}}.tar", good, counts


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_faults_counted_once_and_valid_samples_all_arrive(tmp_path: Path, workers: int) -> None:
    path, good, expected = faulty_shards(tmp_path)
    assert count_samples([str(tmp_path / f"shard-{s}.tar") for s in range(4)]) == 25
    # 21 usable samples; 28 asked for, so each stream (1, or 2 of 2 shards) reads all of its shards once
    # and then re-reads some: every fault is met, the repeats are the shortfall, and no fault counts twice
    spec = DataSpec("webdataset", path=path, num_samples=28, shuffle_buffer=3)
    info = build_train_data(spec, image_transform=AUGMENT, tokenizer=tokenize, batch_size=1, workers=workers)
    info.set_epoch(0)
    got = [c for _, tokens in info.loader for c in decode(tokens)]
    assert set(got) == good and len(got) == 28
    assert info.stats.as_dict() == {**dict.fromkeys(COUNT_FIELDS, 0), "seen": 28, **expected, "shortfall": 7}
    assert sorted(m.split(":")[0] for m in info.stats.bad_shards) == [f"{tmp_path}/shard-2.tar",
                                                                        f"{tmp_path}/shard-3.tar"]


def test_count_samples_survives_cut_shards(tmp_path: Path, caplog) -> None:
    faulty_shards(tmp_path)
    cut = [str(tmp_path / "shard-2.tar"), str(tmp_path / "shard-3.tar")]
    assert count_samples(cut) == 8  # the readable part of each; both named
    assert all(c in caplog.text for c in cut)


def test_corrupt_sample_counted_once_when_a_worker_rereads(tmp_path: Path) -> None:
    # the shard with the corrupt sample has fewer usable samples than its stream's share of the header count,
    # so that worker re-reads it: the corrupt sample is met twice and counted once; the repeat is a shortfall
    for s in range(2):
        members = [m for i in range(6) for m in [(f"{s}{i:03d}.png", shape_png(i) if (s, i) != (0, 2) else b"junk"),
                                                   (f"{s}{i:03d}.txt", f"s{s} i{i}".encode())]]
        write_tar(tmp_path / f"shard-{s}.tar", members)
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{0..1}}.tar", shuffle_buffer=0)
    info = build_train_data(spec, image_transform=AUGMENT, tokenizer=tokenize, batch_size=2, workers=2)
    for epoch in (0, 1):
        epoch_batches(info, epoch)
    stats = info.stats.as_dict()
    assert (stats["seen"], stats["skipped_decode"], stats["shortfall"]) == (24, 2, 2)  # once per epoch


def test_csv_faults_counted_once(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = [b"filepath,title"]
    kinds = ["ok", "undecodable", "undecodable", "ok", "empty", "ok", "latin1", "ok", "missing", "ok", "ok", "ok"]
    for i, kind in enumerate(kinds):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"junk" if kind == "undecodable" else shape_png(i))
        cap = {"empty": b"", "latin1": "caf\xe9".encode("latin-1")}.get(kind, f"c{i}".encode())
        rows.append(f"img/{i}.png".encode() + (b"" if kind == "missing" else b"," + cap))
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    for workers in (0, 2):
        info = build(DataSpec("csv", path=str(tmp_path / "pairs.csv")), workers=workers)
        got = [c for _, tokens in epoch_batches(info, 0) for c in decode(tokens)]
        assert len(got) == 12 and set(got) <= {f"c{i}" for i, k in enumerate(kinds) if k == "ok"}
        # two adjacent bad rows: the first one's substitute search meets the second, counted only once
        assert info.stats.as_dict() == {**dict.fromkeys(COUNT_FIELDS, 0), "seen": 12, "skipped_decode": 2,
                                        "empty_caption": 1, "bad_encoding": 1, "missing_caption": 1, "shortfall": 5}


def test_partial_batch_remainder_counted_per_epoch(tmp_path: Path) -> None:
    info = build(DataSpec("csv", path=good_csv(tmp_path, n=14)), workers=0)  # 14 rows, batches of 3: 2 left
    for epoch in (0, 1):
        epoch_batches(info, epoch)
    assert info.stats.dropped_partial == 4 and info.stats.seen == 24
    (tmp_path / "w").mkdir()
    info = build(DataSpec("webdataset", path=good_shards(tmp_path / "w", n_shards=2, per_shard=7)), workers=2)
    epoch_batches(info, 0)  # 14 samples, 2 streams of batches of 3: 12 delivered
    assert (info.stats.dropped_partial, info.stats.seen) == (2, 12)


@pytest.mark.timeout(60)  # the bug this guards was an endless loop
@pytest.mark.parametrize("fault", ["no_caption", "unreadable"])
def test_resampled_shards_without_a_usable_sample_stop_with_an_error(tmp_path: Path, fault: str) -> None:
    """A resampled stream never ends a pass, so the per-pass guard cannot fire: a budget of shard draws stands
    in for it. Before, a resampled stream of only unusable samples (or unreadable shards) spun forever."""
    for s in range(2):
        path = tmp_path / f"shard-{s}.tar"
        if fault == "unreadable":
            path.write_bytes(b"not a tar file at all" * 40)
        else:
            write_tar(path, [(f"{s}{i:03d}.png", shape_png(i)) for i in range(3)])  # images, no captions
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{0..1}}.tar", num_samples=6, resampled=True)
    info = build(spec, workers=0)
    info.set_epoch(0)
    pattern = rf"{tmp_path}/shard-\d\.tar.*: no usable sample in .* shards \((missing_caption|read_errors) \d+"
    with pytest.raises(NoUsableSamples, match=pattern):
        next(iter(info.loader))


def test_an_empty_shard_is_not_a_read_error(tmp_path: Path, caplog) -> None:
    """A well-formed tar with no members (img2dataset writes one when every download of a shard failed) holds
    no samples: it is counted as 0 without a warning and read without a read_errors count."""
    write_tar(tmp_path / "shard-0.tar", [m for i in range(4) for m in [(f"{i:03d}.png", shape_png(i)),
                                                                        (f"{i:03d}.txt", f"i{i}".encode())]])
    write_tar(tmp_path / "shard-1.tar", [])
    with caplog.at_level(logging.WARNING):
        assert count_samples([str(tmp_path / "shard-0.tar"), str(tmp_path / "shard-1.tar")]) == 4
    assert "shard-1.tar" not in caplog.text
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{0..1}}.tar", num_samples=4, shuffle_buffer=1)
    info = build_train_data(spec, image_transform=AUGMENT, tokenizer=tokenize, batch_size=1, workers=0)
    info.set_epoch(0)
    assert sorted(c for _, tokens in info.loader for c in decode(tokens)) == ["i0", "i1", "i2", "i3"]
    assert info.stats.as_dict()["read_errors"] == 0 and info.stats.bad_shards == []


def test_an_undecodable_image_says_why_without_the_buffer_address() -> None:
    """The skip reason of a file that is not an image names the decoder's error, not PIL's in-memory buffer
    address (which changes every run and says nothing): both the fast decode and a plain transform."""
    from msclip.data.common import transform_image_file
    from msclip.transforms import TrainTransform, UndecodableImage

    for transform in (TrainTransform(16, (0.3, 1.0)), AUGMENT):
        with pytest.raises(UndecodableImage) as info:
            transform_image_file(transform, b"not an image at all", seed=0)
        assert str(info.value) == "UnidentifiedImageError: cannot identify image file"


def test_no_usable_sample_from_a_worker_is_one_error_line(tmp_path: Path) -> None:
    """Shards with nothing usable, read by DataLoader workers: the error comes back as NoUsableSamples (a user
    error) and the CLI's message is its own line, without the worker's wrapped traceback."""
    from msclip.cli import user_message

    for s in range(2):
        (tmp_path / f"shard-{s}.tar").write_bytes(b"not a tar file at all" * 40)
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{0..1}}.tar", num_samples=6)
    info = build(spec, workers=2)
    info.set_epoch(0)
    with pytest.raises(NoUsableSamples) as caught:
        next(iter(info.loader))
    assert "Original Traceback" in str(caught.value)  # how torch hands it back
    message = user_message(caught.value)
    assert message.startswith(f"{tmp_path}/shard-0.tar, {tmp_path}/shard-1.tar: no usable sample in 3 passes")
    assert "\n" not in message and "Traceback" not in message
