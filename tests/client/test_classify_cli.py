"""crossvit-classify against the real server: folders, outputs parsed back, errors, resume, keys."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client.helpers import photo_jpeg, write_photos
from tests.conftest import LIMITED_API_KEY, until

CLI = Path(sys.executable).with_name("crossvit-classify")  # the [project.scripts] entry point


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CROSSVIT_URL", "CROSSVIT_API_KEY")}
    return {**env, **extra}


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *map(str, args), "--no-progress"], capture_output=True, text=True,
                          env=env or _env(), timeout=300)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _api(url: str, path: Path, top_k: int = 5, key: str | None = None) -> dict[str, Any]:
    """What the server says about this file when asked directly."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/classify", params={"top_k": top_k}, headers=headers, timeout=60,
                          files={"images": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def test_folder_to_jsonl_with_errors_and_symlinks(server: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    photos = write_photos(root / "a", 2)
    for name in ("coffee", "rocket"):
        (root / "a" / "b").mkdir(exist_ok=True)
        (root / "a" / "b" / f"{name}.jpg").write_bytes(photo_jpeg(name))
    (root / "corrupt.jpg").write_bytes(photo_jpeg("coffee")[:3000])
    (root / "notes.jpg").write_text("not an image, despite its name\n")
    (root / "readme.txt").write_text("skipped: not an image extension\n")
    (root / "loop").symlink_to(root)  # a folder loop
    (root / "alias.jpg").symlink_to(photos[0])  # the same photo twice
    outside = write_photos(tmp_path / "outside", 1)[0]
    (root / "escape").symlink_to(outside.parent)  # links that leave the folder are not followed
    (root / "escape.jpg").symlink_to(outside)
    out = tmp_path / "results.jsonl"

    run = _run(root, "--url", server, "--out", out, "--concurrency", "2")
    assert run.returncode == 1, run.stderr  # some files failed
    rows = _rows(out)
    paths = [Path(r["path"]) for r in rows]
    assert len(paths) == len(set(paths)) == 6
    assert {p.name for p in paths} == {"alias.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg", "corrupt.jpg",
                                       "notes.jpg"}  # alias.jpg is walked first and stands for a/chelsea.jpg
    assert all(p.is_absolute() and root in p.parents for p in paths)
    for row in rows:
        if row["path"].endswith(("corrupt.jpg", "notes.jpg")):
            assert row["ok"] is False and row["error"]["code"] == "invalid_image" and row["error"]["status"] == 422
            continue
        assert row["ok"] is True
        expected = _api(server, Path(row["path"]))
        assert [p["class_id"] for p in row["predictions"]] == [p["class_id"] for p in expected["predictions"]]
        assert row["agreement"] == pytest.approx(expected["agreement"])
        assert (row["width"], row["height"]) == (expected["width"], expected["height"])
    assert "4 classified, 2 failed, 0 skipped" in run.stderr
    assert "corrupt.jpg: invalid_image" in run.stderr and "notes.jpg: invalid_image" in run.stderr


def test_csv_output_parsed_back(server: str, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", 4)
    out = tmp_path / "results.csv"
    run = _run(photos[0].parent, "--url", server, "--out", out, "--top-k", "3")
    assert run.returncode == 0, run.stderr
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        records = list(reader)
    assert reader.fieldnames is not None and reader.fieldnames[:4] == ["path", "ok", "width", "height"]
    assert "label_3" in reader.fieldnames and "label_4" not in reader.fieldnames
    assert sorted(Path(r["path"]).name for r in records) == sorted(p.name for p in photos)
    for record in records:
        expected = _api(server, Path(record["path"]), top_k=3)
        assert record["ok"] == "true" and record["error_code"] == ""
        assert [record[f"label_{k}"] for k in (1, 2, 3)] == [p["label"] for p in expected["predictions"]]
        assert [int(record[f"class_id_{k}"]) for k in (1, 2, 3)] == [p["class_id"] for p in expected["predictions"]]
        assert float(record["probability_1"]) == pytest.approx(expected["predictions"][0]["probability"], rel=1e-3)
        assert record["top1_agree"] == str(expected["agreement"]["top1_agree"]).lower()
        assert float(record["js_divergence"]) == pytest.approx(expected["agreement"]["js_divergence"], rel=1e-3)

    again = _run(photos[0].parent, "--url", server, "--out", out, "--top-k", "5")
    assert again.returncode == 2 and "--top-k" in again.stderr  # a CSV's columns are fixed by its top-k
    assert len(out.read_text().splitlines()) == 1 + len(photos)


def test_interrupted_run_resumes_where_it_stopped(limited: str, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", 12)
    out = tmp_path / "results.jsonl"
    args = [str(CLI), str(photos[0].parent), "--url", limited, "--out", str(out), "--concurrency", "1",
            "--no-progress"]
    # Ctrl-C as a terminal sends it: a suite started in the background of a non-interactive shell inherits
    # SIGINT ignored, and so would the CLI (it then ran to the end, exit 0)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    with subprocess.Popen(args, env=_env(CROSSVIT_API_KEY=LIMITED_API_KEY), stderr=subprocess.PIPE, text=True,
                          preexec_fn=default_sigint) as first:
        # it writes only a summary to stderr: the pipe cannot fill
        until(lambda: first.poll() is not None or (out.exists() and out.read_text().count("\n") >= 1), 120,
              "the first row")
        assert first.poll() is None, "the first run ended before it could be interrupted"
        first.send_signal(signal.SIGINT)  # Ctrl-C after the first request's rows
        _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    written = _rows(out)
    assert 1 <= len(written) < len(photos) and all(r["ok"] for r in written), stderr
    assert "interrupted" in stderr
    with open(out, "a") as f:
        f.write('{"path": "' + str(photos[-1]) + '", "ok": tr')  # and a row cut off mid-write

    second = _run(photos[0].parent, "--url", limited, "--out", out, env=_env(CROSSVIT_API_KEY=LIMITED_API_KEY))
    assert second.returncode == 0, second.stderr
    assert f"{len(photos) - len(written)} classified, 0 failed, {len(written)} skipped" in second.stderr
    rows = _rows(out)  # every line parses: the cut-off one was dropped
    assert sorted(r["path"] for r in rows) == sorted(map(str, photos))
    assert rows[: len(written)] == written and all(r["ok"] for r in rows)


def test_api_keys_from_the_flag_or_the_environment(limited: str, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", 2)
    refused = _run(photos[0].parent, "--url", limited, "--out", tmp_path / "none.jsonl")
    assert refused.returncode == 2 and "401 unauthorized" in refused.stderr
    by_flag = _run(photos[0].parent, "--url", limited, "--api-key", LIMITED_API_KEY, "--out", tmp_path / "flag.jsonl")
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = _run(photos[0].parent, env=_env(CROSSVIT_URL=limited, CROSSVIT_API_KEY=LIMITED_API_KEY))
    assert by_env.returncode == 0, by_env.stderr
    (tmp_path / "stdout.jsonl").write_text(by_env.stdout)  # without --out the rows go to stdout
    for name in ("flag.jsonl", "stdout.jsonl"):
        rows = _rows(tmp_path / name)
        assert sorted(r["path"] for r in rows) == sorted(map(str, photos)) and all(r["ok"] for r in rows)


def test_missing_path_and_bad_output_stop_before_any_work(tmp_path: Path) -> None:
    missing = _run(tmp_path / "nowhere", "--out", tmp_path / "r.jsonl")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    write_photos(tmp_path / "photos", 1)
    bad = _run(tmp_path / "photos", "--out", tmp_path / "results.txt")
    assert bad.returncode == 2 and ".jsonl or .csv" in bad.stderr
