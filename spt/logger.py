"""Metric sinks behind one small interface: CSV always, TensorBoard when installed."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricLogger:
    """Appends (step, split, name, value) rows to ``metrics.csv``; mirrors them to TensorBoard if available."""

    def __init__(self, folder: Path, tensorboard: bool = True):
        self.path = Path(folder) / "metrics.csv"
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "split", "name", "value"])
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(folder) / "tb"))
            except ImportError:
                log.debug("tensorboard not installed; logging to CSV only")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._csv.writerow([step, split, name, f"{value:.6g}"])
            if self._tb is not None:
                self._tb.add_scalar(f"{split}/{name}", value, step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(split, name): [(step, value), ...]} from a metrics.csv."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            out.setdefault((row["split"], row["name"]), []).append((int(row["step"]), float(row["value"])))
    return out
