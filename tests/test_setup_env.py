"""scripts/setup_env.sh stops with a clear message when the disk cannot hold torch (CI once ran out mid-install)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_refuses_a_nearly_full_disk_before_installing(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    df = fake_bin / "df"  # reports 287 MB free, whatever the real disk holds
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  "echo '/dev/x 1000000 999000 293888 99% /'\n")
    df.chmod(0o755)
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), sys.executable, str(venv)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"287 MB free on the disk holding {venv}" in proc.stderr
    assert "installing pinned requirements" not in proc.stdout  # stopped before pip ran
    assert not list(venv.glob("lib/python*/site-packages/torch"))
