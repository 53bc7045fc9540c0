"""The OpenAPI contract, fuzzed: schemathesis against the real server, /v1 and /v2, bounded and seeded.

Every check but the stateful and authorization ones: no schema-valid request refused (positive data
acceptance), no schema-violating one served (negative data rejection), every status, header, content
type and JSON body as documented, and no 5xx except the documented 504 when the client's own
X-Request-Timeout-Ms (1 ms is a schema-valid value) passed first. tests/service/contract_hooks.py
says what the schema cannot: which bytes are images.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Reference, run_server

pytest.importorskip("schemathesis", reason="schemathesis 4.32+ needs Python 3.11 (the dev extra's marker)")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEED = 20261202
MAX_EXAMPLES = 8  # per operation in the fuzzing phase; the coverage phase adds its boundary cases
MIN_CASES = 200


@pytest.fixture(scope="module")
def contract_server(reference: Reference) -> Iterator[str]:
    """Small limits, so that the boundary cases (the most images a request may hold) stay cheap."""
    with run_server(weights=str(reference.checkpoint), workers=2, max_images_per_request=4) as url:
        yield url


def test_openapi_contract_holds_under_fuzzing(contract_server: str, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(HERE / "schemathesis.toml"),
        "run", f"{contract_server}/openapi.json",
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--workers", "1", "--generation-database", "none", "--no-color",
        "--checks", "all", "--exclude-checks",
        "not_a_server_error,ignored_auth,use_after_free,ensure_resource_availability,object_level_authorization",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.contract_hooks",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    cases = re.search(r"(\d+) generated", run.stdout)
    assert cases and int(cases.group(1)) >= MIN_CASES, run.stdout[-3_000:]
    assert "15 selected / 15 total" in run.stdout, run.stdout[:3_000]  # every /v1 and /v2 operation
