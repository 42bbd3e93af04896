"""Run metrics to ``metrics.jsonl`` (every record), ``<kind>.csv`` (one file per record kind) and TensorBoard."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep them readable instead of failing the whole log line
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Append-only; on resume the files are appended to (CSV headers are reused)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.csv_cols: dict[str, list[str]] = {}
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to JSONL/CSV only")

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self._write_csv(kind, record)
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def _write_csv(self, kind: str, record: dict[str, Any]) -> None:
        path = self.run_dir / f"{kind}.csv"
        if kind not in self.csv_cols:
            if path.is_file() and path.stat().st_size > 0:
                with open(path, newline="") as f:
                    self.csv_cols[kind] = next(csv.reader(f))
            else:
                self.csv_cols[kind] = list(record)
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(self.csv_cols[kind])
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, self.csv_cols[kind], extrasaction="ignore").writerow(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records from ``metrics.jsonl``; for a resumed run the last record per (kind, step) wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec["kind"] == kind:
                latest[(rec["kind"], rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
