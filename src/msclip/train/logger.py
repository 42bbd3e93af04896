"""Run metrics to ``metrics.jsonl`` (every record), ``metrics-<kind>.csv`` (one file per record kind, e.g.
``metrics-train.csv``, ``metrics-zeroshot.csv``) and TensorBoard.

A resumed run continues the files of the run it resumes. Records past the resumed step (written by the
interrupted run after its last checkpoint) are dropped first, so each step appears once in every file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from msclip import io as mio

log = logging.getLogger(__name__)

METRICS_JSONL = "metrics.jsonl"


def csv_path(run_dir: str | Path, kind: str) -> Path:
    """The CSV of one record kind; named so that it is not mistaken for a data file such as ``train.csv``."""
    return Path(run_dir) / f"metrics-{kind}.csv"


def metrics_files(run_dir: str | Path) -> list[Path]:
    """Every metrics file present in ``run_dir`` (the JSONL and the per-kind CSVs)."""
    run_dir = Path(run_dir)
    return [p for p in [run_dir / METRICS_JSONL, *sorted(run_dir.glob("metrics-*.csv"))] if p.is_file()]


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep them readable instead of failing the whole log line
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _step_of(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def truncate_metrics(run_dir: str | Path, last_step: int) -> int:
    """Drop the records of steps after ``last_step`` (all of them when ``last_step`` is 0: a fresh start)
    from every metrics file, rewriting each atomically; returns how many records were dropped."""
    def keep(step: Any) -> bool:
        s = _step_of(step)
        return last_step > 0 and s is not None and s <= last_step

    dropped = 0
    for path in metrics_files(run_dir):
        text = path.read_text(errors="replace")
        cut = bool(text) and not text.endswith("\n")  # every record ends in a newline: the last one was cut
        if path.suffix == ".jsonl":
            lines = [ln for ln in text.splitlines() if ln.strip()]
            kept = []
            for ln in lines:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:  # a line cut by a kill: its step is unknown, drop it
                    continue
                if keep(rec.get("step")):
                    kept.append(ln)
            if len(kept) != len(lines) or cut:  # a complete object cut before its newline: given one
                mio.write_text(path, "".join(ln + "\n" for ln in kept))
            dropped += len(lines) - len(kept)
            continue
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            continue
        header, body = rows[0], rows[1:]
        col = header.index("step") if "step" in header else None
        # a row without its newline may be cut inside its last field (a number with digits missing): dropped
        usable = body[:-1] if cut and body else body
        kept_rows = [r for r in usable if col is not None and len(r) == len(header) and keep(r[col])]
        if len(kept_rows) != len(body) or cut:
            out = io.StringIO(newline="")
            csv.writer(out).writerows([header, *kept_rows])
            mio.write_text(path, out.getvalue())
        dropped += len(body) - len(kept_rows)
    return dropped


class RunLogger:
    """Appends records; ``start_step``: the step this invocation starts from (the resumed checkpoint's, 0 for
    a fresh run): records after it are removed from the files first (see ``truncate_metrics``)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        mio.make_folder(self.run_dir)
        dropped = truncate_metrics(self.run_dir, start_step)
        if dropped:
            log.info("metrics: dropped %d record(s) after step %d, written by the earlier run past its last "
                     "checkpoint", dropped, start_step)
        # Every write below goes through mio.reporting_writes: a full disk stops the run with one error line
        # naming the file, not a traceback (from TensorBoard's writer thread, too).
        with mio.reporting_writes(self.run_dir / METRICS_JSONL):
            self.jsonl = open(self.run_dir / METRICS_JSONL, "a", buffering=1)
        self.csv_cols: dict[str, list[str]] = {}
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; logging to JSONL/CSV only")
            else:
                with mio.reporting_writes(self._tb_dir):
                    # purge_step: TensorBoard hides the interrupted run's events past the resumed step
                    self.tb = SummaryWriter(str(self._tb_dir), purge_step=start_step or None)

    @property
    def _tb_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        with mio.reporting_writes(self.run_dir / METRICS_JSONL):
            self.jsonl.write(json.dumps(record) + "\n")
        with mio.reporting_writes(csv_path(self.run_dir, kind)):
            self._write_csv(kind, record)
        if self.tb is not None:
            with mio.reporting_writes(self._tb_dir):
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        self.tb.add_scalar(f"{kind}/{key}", value, step)

    def _write_csv(self, kind: str, record: dict[str, Any]) -> None:
        path = csv_path(self.run_dir, kind)
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
        """Idempotent: the trainer closes on success and again, as a safety net, on the way out."""
        if not self.enabled or self.jsonl.closed:
            return
        with mio.reporting_writes(self.run_dir / METRICS_JSONL):
            self.jsonl.close()
        if self.tb is not None:
            with mio.reporting_writes(self._tb_dir):
                self.tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records from ``metrics.jsonl`` in step order; if a step appears twice the last record wins."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a record cut by a kill (a resume drops it from the file too)
                continue
            if kind is None or rec["kind"] == kind:
                latest[(rec["kind"], rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
