"""Result files of crossvit-classify: one row per image, JSON Lines or CSV, appended as they come.

A run can be interrupted at any point and started again: rows already there with a result are
skipped, failed ones are tried again (a later row for the same path supersedes an earlier one),
and a last line cut off mid-write is dropped before appending.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Any

from .api import Outcome
from .errors import APIError
from .wire import ImageResultModel

__all__ = ["OutputError", "ResultsFile", "row"]


class OutputError(Exception):
    """The output file cannot be used (unknown extension, written with another --top-k)."""


def row(path: str, outcome: Outcome) -> dict[str, Any]:
    """The JSON row of one image: its result, or its error."""
    if isinstance(outcome, ImageResultModel):
        return {
            "path": path, "ok": True, "width": outcome.width, "height": outcome.height,
            "predictions": [p.model_dump() for p in outcome.predictions],
            "agreement": outcome.agreement.model_dump(),
        }
    error: dict[str, Any] = {"code": outcome.code, "message": outcome.message}
    if isinstance(outcome, APIError):
        error["status"] = outcome.status
    return {"path": path, "ok": False, "error": error}


def _csv_columns(top_k: int) -> list[str]:
    ranked = [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in ("label", "class_id", "probability")]
    return ["path", "ok", "width", "height", *ranked, "top1_agree", "js_divergence", "error_code", "error_message"]


def _csv_record(data: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"path": data["path"], "ok": str(data["ok"]).lower()}
    if data["ok"]:
        record.update(width=data["width"], height=data["height"],
                      top1_agree=str(data["agreement"]["top1_agree"]).lower(),
                      js_divergence=data["agreement"]["js_divergence"])
        for rank, p in enumerate(data["predictions"], start=1):
            record.update({f"label_{rank}": p["label"], f"class_id_{rank}": p["class_id"],
                           f"probability_{rank}": p["probability"]})
    else:  # one physical line per record, so that a cut-off last line is all that resuming drops
        record.update(error_code=data["error"]["code"], error_message=" ".join(data["error"]["message"].split()))
    return record


def _drop_partial_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class ResultsFile:
    """Appends rows to `path` (".jsonl" or ".csv"), or writes JSON Lines to stdout when None."""

    def __init__(self, path: Path | None, top_k: int) -> None:
        self.path = path
        self.done: set[str] = set()  # paths that already have a result
        self._csv = path is not None and path.suffix.lower() == ".csv"
        if path is not None and not self._csv and path.suffix.lower() not in (".jsonl", ".ndjson"):
            raise OutputError(f"--out must end in .jsonl or .csv, got {path.name}")
        columns = _csv_columns(top_k)
        fresh = path is None or not path.exists() or path.stat().st_size == 0
        if path is not None and not fresh:
            _drop_partial_line(path)
            self.done = self._read_csv(path, columns) if self._csv else self._read_jsonl(path)
        self._file: IO[str] = sys.stdout if path is None else open(path, "a", newline="" if self._csv else None)
        self._writer = csv.DictWriter(self._file, columns, lineterminator="\n") if self._csv else None
        if self._writer is not None and fresh:
            self._writer.writeheader()

    @staticmethod
    def _read_jsonl(path: Path) -> set[str]:
        done: set[str] = set()
        with open(path) as f:
            for line in f:
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(data, dict) and data.get("ok") is True and isinstance(data.get("path"), str):
                    done.add(data["path"])
        return done

    @staticmethod
    def _read_csv(path: Path, columns: list[str]) -> set[str]:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                raise OutputError(
                    f"{path} has other columns ({len(reader.fieldnames or [])}, expected {len(columns)}): "
                    "was it written with another --top-k? use the same --top-k or a new file"
                )
            return {r["path"] for r in reader if r.get("ok") == "true"}

    def write(self, path: str, outcome: Outcome) -> None:
        data = row(path, outcome)
        if self._writer is not None:
            self._writer.writerow(_csv_record(data))
        else:
            self._file.write(json.dumps(data) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()
