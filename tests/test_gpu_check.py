"""benchmarks/gpu_check.py on the CPU (--cpu-smoke: tiny configs, the CUDA-only parts left out), so that the
script a lent GPU runs is known to work before the GPU is there."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_peak_table(gc) -> None:
    assert gc.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gc.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert gc.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gc.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gc.peak_bf16_tflops("Tesla T4") is None


def test_synthetic_tokens_pool_at_their_eot(gc) -> None:
    import msclip

    cfg = msclip.get_model_config("clip-b32-tiny")
    tok = gc.synthetic_tokens(cfg, 32)
    eot = tok.argmax(dim=-1)
    assert (tok[torch.arange(32), eot] == cfg.text.vocab_size - 1).all() and (tok[:, 0] == cfg.text.vocab_size - 2).all()
    assert ((tok != 0).sum(dim=-1) == eot + 1).all() and 6 <= int(eot.max()) + 1 <= 30  # caption-like lengths


def test_cpu_smoke_runs_every_section(gc, tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None) -> None:
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-smoke", "--skip", "dist", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["status"] == {"train": "ok", "bf16": "ok", "clip-b16": "ok", "jpeg": "ok"}, text
    res = rep["results"]
    for name in ("msclip-s-b16-tiny", "msclip-s-b32-tiny"):
        r = res[f"train/{name}/eager"]
        assert r["tflops"] > 0 and r["mfu"] is None  # the CPU has no entry in the peak table
    assert "peak unknown" in text and "total" in text
    assert min(v for k, v in res.items() if k.startswith("bf16/")) >= 0.999
    assert res["clip-b16/eager fp32"] < 1e-3 and res["jpeg"]["cpu (one thread per call)"] > 0


def test_a_failing_section_is_reported_and_the_rest_still_run(gc, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    def boom(ck):
        raise RuntimeError("section exploded")

    monkeypatch.setitem(gc.SECTIONS, "bf16", boom)
    monkeypatch.setitem(gc.SECTIONS, "train", lambda ck: ["trained"])
    assert gc.main(["--cpu-smoke", "--only", "train", "bf16", "jpeg"]) == 1
    text = capsys.readouterr().out
    assert "bf16       FAILED: RuntimeError: section exploded" in text
    assert "train      ok" in text and "jpeg       ok" in text


def test_dist_section_launches_its_worker_and_reports_it(gc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         one_thread: None) -> None:
    """The section's worker (DDP step, then every rank's weights against rank 0's) runs here as a 1-rank gloo
    group, and the section launches it through torchrun with 2 processes and reads its report. (A 2-rank
    launch of real processes: tests/test_multinode.py, tests/test_loss.py; on a lent GPU, with 2 of them.)"""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    out = tmp_path / "worker.json"
    try:
        gc.dist_worker(out, "cpu", "clip-b32-tiny")
    finally:
        if dist.is_initialized():  # the worker leaves a 1-process group alone
            dist.destroy_process_group()
    worker = json.loads(out.read_text())
    assert worker["world_size"] == 1 and worker["max_weight_diff"] == 0 and worker["backend"] == "gloo"

    launched = []

    def fake_run(cmd, **kw):
        launched.append(cmd)
        Path(cmd[cmd.index("--dist-worker") + 1]).write_text(json.dumps({**worker, "world_size": 2}))
        return gc.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gc.subprocess, "run", fake_run)
    ck = gc.Check(device=torch.device("cpu"), smoke=True, batch=4, steps=1, budget_s=60)
    lines = gc.section_dist(ck)
    (cmd,) = launched
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and cmd[4] == "2"
    assert cmd[cmd.index("--model") + 1] == "clip-b32-tiny" and cmd[cmd.index("--device") + 1] == "cpu"
    assert ck.results["dist"]["world_size"] == 2 and "x2: DDP bf16 step" in lines[0]