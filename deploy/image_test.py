"""`make image-test`: build the CPU image on this machine and prove that it runs as deploy/README.md says.

As root, with nothing prepared: installs Debian's docker.io, debootstrap and docker-compose when
missing, starts dockerd when it is not running, debootstraps a bookworm base image (no registry
is needed), builds the `cpu` target (the lean server: no torch, a model prepared at build time) with
this machine's pip settings, then checks the image: no torch and no checkpoint inside; a start
without a prepared entry for its model, or with the random entry not allowed, refused; and under
`docker run` (--network host, --read-only, --tmpfs /tmp, --user 10001) and under docker compose
(the CPU service of docker-compose.yml): healthy by its own HEALTHCHECK, a real photo classified,
/v1/models, every process uid 10001, `docker stop` exits 0 within the grace period after draining.
Then it removes its containers, volumes and networks (the images stay, as a cache) and stops the
dockerd it started. The model is crossvit_tiny_240 with random weights (no hub here), prepared by
the build (RANDOM_MODELS) and served with CROSSVIT_ALLOW_RANDOM_WEIGHTS=true, so it starts in
seconds; its answers are meaningless, which the service says itself (`pretrained: false`).

This machine's pip settings reach the build as two build secrets (a pip.conf and its CA bundle),
never as files of the project; local indexes and wheel folders (file:// or paths) are served to
the build over HTTP on 127.0.0.1 for its duration (the build uses the host network).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.photos import encode, photo  # noqa: E402  (the repository's own test photos)

IMAGE = "crossvit-serve:cpu"  # docker-compose.yml's CPU service runs this tag
BASE_IMAGE = "crossvit-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,passwd"
CONTAINER = "crossvit-image-test"
COMPOSE_PROJECT = "crossvit-image-test"
COMPOSE_SERVICE = "crossvit"
STOP_GRACE_S = 40  # docker-compose.yml's stop_grace_period; the server drains within 25 s
UNPREPARED_MODEL = "crossvit_9_240"  # a variant the build prepares no entry for
MODEL_ENV = {
    "CROSSVIT_MODEL": "crossvit_tiny_240",
    "CROSSVIT_ALLOW_RANDOM_WEIGHTS": "true",
    "CROSSVIT_FETCH_WEIGHTS": "false",
}
APT_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
DRAIN_LINES = ("shutdown signal: draining", "drained")
WORK = REPO / "build" / "image-test"  # logs and scratch; ignored by git


class CheckFailed(AssertionError):
    pass


class Report:
    """Counts checks and collects the numbers the summary prints."""

    def __init__(self) -> None:
        self.passed = 0
        self.facts: list[tuple[str, str]] = []

    def check(self, what: str, ok: bool, detail: object = "") -> None:
        """Passes, or stops the test with `detail` (what was seen instead)."""
        if not ok:
            raise CheckFailed(f"{what}: {detail}")
        self.passed += 1
        print(f"  ok    {what}", flush=True)

    def fact(self, name: str, value: str) -> None:
        self.facts.append((name, value))
        print(f"  ----  {name}: {value}", flush=True)


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 600, log: Path | None = None,
        env: dict[str, str] | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    """Run a command; its output goes to `log` when given (and its tail is shown on failure)."""
    if log is None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=stdin)
        output = done.stdout + done.stderr
    else:
        with log.open("w") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env,
                                  stdin=stdin)
        output = log.read_text()
    if check and done.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise CheckFailed(f"`{shlex.join(argv)}` exited {done.returncode}:\n{tail}")
    return done


# ---------------------------------------------------------------- docker engine, CLI and compose


def _has_buildkit(cli: str) -> bool:
    """Docker CLIs >= 23 build through the buildx plugin; 20.10 has BuildKit built in (DOCKER_BUILDKIT=1)."""
    if run([cli, "buildx", "version"], check=False).returncode == 0:
        return True
    version = run([cli, "version", "--format", "{{.Client.Version}}"], check=False).stdout.strip()
    major = re.match(r"(\d+)\.", version)
    return major is not None and int(major.group(1)) < 23


def ensure_packages() -> None:
    missing = [pkg for tool, pkg in APT_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, log=WORK / "apt.log")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, log=WORK / "apt.log")


def docker_cli() -> str:
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and os.access(c, os.X_OK)]
    for cli in dict.fromkeys(candidates):
        if _has_buildkit(cli):
            return cli
    raise CheckFailed(f"no docker CLI that can build with BuildKit among {candidates}")


@contextlib.contextmanager
def engine(cli: str) -> Iterator[None]:
    """dockerd up for the block: the running one, or one started here and stopped afterwards."""
    if run([cli, "info"], check=False).returncode == 0:
        yield
        return
    say("starting dockerd")
    log = (WORK / "dockerd.log").open("w")
    daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while run([cli, "info"], check=False).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"dockerd did not come up; see {WORK / 'dockerd.log'}")
            time.sleep(0.5)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()


def compose_cli(cli: str) -> list[str]:
    if run([cli, "compose", "version"], check=False).returncode == 0:
        return [cli, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise CheckFailed("neither `docker compose` nor docker-compose is installed")


# ---------------------------------------------------------------- base image


def ensure_base(cli: str, report: Report, rebuild: bool) -> None:
    if not rebuild and run([cli, "image", "inspect", BASE_IMAGE], check=False).returncode == 0:
        report.fact("base image", f"{BASE_IMAGE} (already built)")
        return
    say(f"debootstrapping {BASE_IMAGE}: minimal bookworm with {BASE_PACKAGES}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bookworm-", dir=WORK) as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root)],
            log=WORK / "debootstrap.log", timeout=1200)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run([cli, "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise CheckFailed("tar of the bookworm root failed")
    report.fact("base image", f"{BASE_IMAGE} debootstrapped and imported in {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------- this machine's pip settings, for the build


def _pip_settings() -> dict[str, list[str]]:
    """index-url, extra-index-url, find-links and cert as this machine's pip sees them (config files and PIP_*)."""
    listed = run([sys.executable, "-m", "pip", "config", "list"]).stdout
    found: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in ("index-url", "extra-index-url", "find-links", "cert"):
            found[option] = value.strip().strip("'\"").split()  # the last one listed wins, as in pip
    for option in ("index-url", "extra-index-url", "find-links", "cert"):
        env = os.environ.get("PIP_" + option.upper().replace("-", "_"))
        if env:
            found[option] = env.split()
    return found


class _LocalFiles(http.server.SimpleHTTPRequestHandler):
    """Serves absolute paths under `roots` only, as they lie on disk: a simple index's relative links keep working."""

    roots: tuple[Path, ...] = ()

    def translate_path(self, path: str) -> str:
        local = Path(super().translate_path(path))
        if not any(local == root or root in local.parents for root in self.roots):
            return "/nonexistent/forbidden"
        return str(local)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def pip_secrets() -> Iterator[list[str]]:
    """`--secret` arguments carrying this machine's pip settings; local sources served over HTTP meanwhile."""
    settings = _pip_settings()
    roots: list[Path] = []

    def served(location: str, index: bool) -> str:
        path = Path(location.removeprefix("file://")) if location.startswith("file://") or "://" not in location \
            else None
        if path is None:
            return location
        # a simple index links to its files with "../../files/..." beside it: serve its parent too
        roots.append(path.parent if index else path)
        return f"http://127.0.0.1:{{port}}{path}"

    lines = ["[global]"]
    for option in ("index-url", "extra-index-url", "find-links"):
        if option in settings:
            lines.append(f"{option} = " + " ".join(served(v, option != "find-links") for v in settings[option]))
    secrets: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pip-", dir=WORK) as tmp:
        if settings.get("cert"):
            lines.append("cert = /run/secrets/pip-ca")
            secrets += ["--secret", f"id=pip-ca,src={settings['cert'][0]}"]
        handler = type("Handler", (_LocalFiles,), {"roots": tuple(roots)})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory="/"))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            conf = Path(tmp) / "pip.conf"
            conf.write_text("\n".join(lines).replace("{port}", str(server.server_address[1])) + "\n")
            print("  pip.conf for the build:\n" + "".join(f"    {line}\n" for line in conf.read_text().splitlines()))
            yield [*secrets, "--secret", f"id=pip.conf,src={conf}"]
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


# ---------------------------------------------------------------- build


def _default_torch_index() -> str:
    match = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return match.group(1) if match else ""


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=15):
            return True
    except (urllib.error.URLError, OSError):
        return False


def build(cli: str, report: Report, torch_index: str | None) -> None:
    if torch_index is None:
        default = _default_torch_index()
        torch_index = default if default and _reachable(default) else ""
        why = "reachable" if torch_index else f"{default} unreachable, so PyPI's torch (CUDA libraries included)"
    else:
        why = "given"
    say(f"building {IMAGE}, the model prepared by a stage with torch (torch: "
        f"{torch_index or 'PyPI, as serve.txt locks it'}; {why})")
    with pip_secrets() as secrets:
        started = time.monotonic()
        run([cli, "build", "--network", "host", "--progress", "plain", "--target", "cpu", "-t", IMAGE,
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_INDEX_URL={torch_index}",
             "--build-arg", f"RANDOM_MODELS={MODEL_ENV['CROSSVIT_MODEL']}", *secrets, str(REPO)],
            log=WORK / "build.log", env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=2400)
        elapsed = time.monotonic() - started
    size = int(run([cli, "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout)
    report.fact("build time", f"{elapsed:.1f} s (log: {(WORK / 'build.log').relative_to(REPO)})")
    report.fact("image size", f"{size / 1e9:.2f} GB ({size} bytes, {IMAGE}, lean: no torch; torch for preparing "
                              f"from {torch_index or 'PyPI'}, in a build stage only)")


def check_image(cli: str, report: Report) -> None:
    """What the lean image holds: the server without torch, the prepared model without a checkpoint."""
    say(f"inside {IMAGE}: no torch, no checkpoint, the prepared entries")
    script = (
        "import importlib.util, json, os, pathlib\n"
        "cache = pathlib.Path(os.environ['CROSSVIT_CACHE_DIR'])\n"
        "files = [p for p in cache.rglob('*') if p.is_file()]\n"
        "print(json.dumps({'missing': [m for m in ('torch', 'safetensors', 'huggingface_hub', 'sympy')\n"
        "                              if importlib.util.find_spec(m) is None],\n"
        "                  'present': [m for m in ('openvino', 'fastapi', 'numpy') if importlib.util.find_spec(m)],\n"
        "                  'entries': sorted(str(p.relative_to(cache)) for p in files),\n"
        "                  'bytes': sum(p.stat().st_size for p in files),\n"
        "                  'checkpoints': [os.path.join(d, f) for top in ('/weights', '/opt', '/src', '/tmp')\n"
        "                                  for d, _, names in os.walk(top) for f in names\n"
        "                                  if f.endswith(('.safetensors', '.pth', '.pt'))\n"
        "                                  and os.path.getsize(os.path.join(d, f)) > 1_000_000]}))\n"
    )  # a checkpoint: over 1 MB (site-packages' .pth files are path hooks of a few bytes)
    done = run([cli, "run", "--rm", "--network", "none", "--read-only", "--user", "10001", IMAGE,
                "python", "-c", script])
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    report.check("torch, safetensors, huggingface_hub and sympy are not installed",
                 seen["missing"] == ["torch", "safetensors", "huggingface_hub", "sympy"], seen["missing"])
    report.check("openvino, fastapi and numpy are", seen["present"] == ["openvino", "fastapi", "numpy"],
                 seen["present"])
    names = {Path(entry).name for entry in seen["entries"]}
    report.check("a prepared entry (model.xml, model.bin, heads.npz, probe.npz, golden.npz, prepared.json) in "
                 "CROSSVIT_CACHE_DIR", {"model.xml", "model.bin", "heads.npz", "probe.npz", "golden.npz",
                                        "prepared.json"} <= names, seen["entries"])
    report.check("no checkpoint file in the image", seen["checkpoints"] == [], seen["checkpoints"])
    report.fact("prepared models", f"{seen['bytes'] / 1e6:.1f} MB: {', '.join(seen['entries'])}")


def check_refusals(cli: str, report: Report) -> None:
    """The lean image serves only what its build prepared, and random weights only when allowed."""
    say(f"{IMAGE} refuses what it cannot serve")
    cases: list[tuple[str, dict[str, str], str, Callable[[int, str], bool]]] = [  # what, env, must, did it
        ("no entry for the model", {**MODEL_ENV, "CROSSVIT_MODEL": UNPREPARED_MODEL},
         "refuses to start, naming `crossvit-serve --prepare-only`",
         lambda code, out: code != 0 and "--prepare-only" in out),
        ("the random entry, not allowed", {**MODEL_ENV, "CROSSVIT_ALLOW_RANDOM_WEIGHTS": "false"},
         "refuses to start", lambda code, out: code != 0),
    ]
    for what, settings, expected, ok in cases:
        env = [f"--env={k}={v}" for k, v in settings.items()]
        started = time.monotonic()
        done = run([cli, "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "10001",
                    *env, IMAGE], check=False, timeout=180)
        elapsed = time.monotonic() - started
        output = (done.stdout + done.stderr).strip()
        said = [line for line in output.splitlines() if "cannot start" in line] or output.splitlines()[-1:]
        report.fact(f"refused, {what}", f"exit {done.returncode} after {elapsed:.1f} s: {' '.join(said)[-400:]}")
        report.check(f"{what}: {expected}", ok(done.returncode, output), f"exit {done.returncode}: {output[-1500:]}")


# ---------------------------------------------------------------- checks against a running container


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inspect(cli: str, container: str, template: str) -> str:
    return run([cli, "inspect", "--format", template, container]).stdout.strip()


def wait_ready(probes: str, label: str, started: float, report: Report, timeout_s: float = 300) -> None:
    """Until /readyz answers 200, asked every 0.1 s: the start itself. Docker's "healthy" comes later, at
    the first HEALTHCHECK after it (every 2 s; Docker 20.10 has no separate start-up interval)."""
    with httpx.Client(timeout=2) as client:
        while time.monotonic() - started < timeout_s:
            try:
                if client.get(f"{probes}/readyz").status_code == 200:
                    report.fact(f"{label}: ready (/readyz 200) after", f"{time.monotonic() - started:.1f} s")
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise CheckFailed(f"{label}: /readyz not 200 after {timeout_s} s")


def wait_healthy(cli: str, container: str, label: str, started: float, report: Report, timeout_s: float = 300) -> None:
    while True:
        state = json.loads(_inspect(cli, container, "{{json .State}}"))
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            break
        if not state.get("Running") or health == "unhealthy" or time.monotonic() - started > timeout_s:
            logs = run([cli, "logs", "--tail", "60", container], check=False)
            raise CheckFailed(f"{container} is {health or state.get('Status')}:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)
    report.check("Docker's HEALTHCHECK reports healthy", True)
    report.fact(f"{label}: healthy after", f"{time.monotonic() - started:.1f} s")


def check_service(cli: str, container: str, label: str, port: int, report: Report) -> None:
    base = f"http://127.0.0.1:{port}"
    jpeg = encode(photo("chelsea"), "JPEG", quality=90)
    with httpx.Client(base_url=base, timeout=60) as client:
        response = client.post("/v1/classify", params={"top_k": 3},
                               files=[("images", ("chelsea.jpg", jpeg, "image/jpeg"))])
        report.check("POST /v1/classify answers 200 right after healthy", response.status_code == 200,
                     response.status_code if response.status_code != 200 else "")
        body = response.json()
        (result,) = body["results"]
        top = result["predictions"][0]
        report.check("the photo comes back as sent", (result["filename"], result["width"], result["height"])
                     == ("chelsea.jpg", 451, 300), result)
        report.check("three predictions with ImageNet labels", len(result["predictions"]) == 3
                     and all(p["label"] for p in result["predictions"]))
        report.check("X-Model-Pretrained: false (random weights, said so)",
                     response.headers.get("x-model-pretrained") == "false")
        answer = (f"{top['label']!r} (class {top['class_id']}, p={top['probability']:.4f}), "
                  f"{body['timing_ms']['total']} ms")
        report.fact(f"{label}: classify chelsea.jpg", answer)
        models = client.get("/v1/models").json()
        report.check("/v1/models names the model, random weights, CPU workers ready",
                     models["name"] == MODEL_ENV["CROSSVIT_MODEL"] and models["weights"]["pretrained"] is False
                     and models["devices"] == ["cpu"] and models["worker_count"] >= 1, models["workers"])
        ready = [w for w in models["workers"] if w["state"] == "ready"]
        report.check("each ready worker passed the self-test on the golden images the package ships",
                     bool(ready) and all(w.get("self_test", {}).get("passed") is True for w in ready),
                     [w.get("self_test") for w in models["workers"]])
    uids = run([cli, "exec", container, "python", "-c",
                "import glob, re; print(sorted({re.search(r'^Uid:\\s+(\\d+)', open(p).read(), re.M).group(1) "
                "for p in glob.glob('/proc/[0-9]*/status')}))"]).stdout.strip()
    report.check("every process in the container runs as uid 10001", uids == "['10001']", uids)
    writes = run([cli, "exec", container, "python", "-c",
                  "import tempfile\ntry:\n open('/probe', 'w')\nexcept OSError as e:\n print(e.errno)\n"
                  "tempfile.NamedTemporaryFile(dir='/tmp')"], check=False)
    report.check("root filesystem read-only, /tmp writable", writes.returncode == 0 and writes.stdout.strip() == "30",
                 writes.stdout + writes.stderr)  # 30: EROFS


def check_stop(cli: str, container: str, label: str, stop: Sequence[str], report: Report) -> None:
    started = time.monotonic()
    run(stop, timeout=STOP_GRACE_S + 30)
    elapsed = time.monotonic() - started
    code = int(_inspect(cli, container, "{{.State.ExitCode}}"))
    printed = run([cli, "logs", container])
    logs = printed.stdout + printed.stderr
    report.check("stopped within the grace period with exit code 0", code == 0 and elapsed < STOP_GRACE_S,
                 f"exit {code} after {elapsed:.1f} s of {STOP_GRACE_S} s")
    report.check("the log shows the drain", all(line in logs for line in DRAIN_LINES), logs[-2000:])
    report.fact(f"{label}: stop", f"exit code {code} after {elapsed:.1f} s (grace {STOP_GRACE_S} s)")


def docker_run(cli: str, report: Report) -> None:
    say(f"docker run {IMAGE}: --network host --read-only --tmpfs /tmp --user 10001")
    port, probe_port = _free_port(), _free_port()
    settings = {**MODEL_ENV, "CROSSVIT_PORT": str(port), "CROSSVIT_PROBE_PORT": str(probe_port)}
    env = [f"--env={k}={v}" for k, v in settings.items()]
    started = time.monotonic()
    run([cli, "run", "--detach", "--name", CONTAINER, "--network", "host", "--read-only", "--tmpfs", "/tmp",
         "--user", "10001", "--shm-size", "1g", "--stop-timeout", str(STOP_GRACE_S), *env, IMAGE])
    wait_ready(f"http://127.0.0.1:{probe_port}", "docker run", started, report)
    wait_healthy(cli, CONTAINER, "docker run", started, report)  # the HEALTHCHECK asks the probe listener
    check_service(cli, CONTAINER, "docker run", port, report)
    with httpx.Client(base_url=f"http://127.0.0.1:{probe_port}", timeout=10) as probes:
        answers = {path: probes.get(path).status_code for path in ("/healthz", "/readyz", "/metrics")}
    report.check("the probe listener answers /healthz, /readyz and /metrics", set(answers.values()) == {200},
                 answers)
    check_stop(cli, CONTAINER, "docker run", [cli, "stop", "--time", str(STOP_GRACE_S), CONTAINER], report)


def compose_run(cli: str, compose: list[str], report: Report) -> None:
    say(f"{' '.join(compose)} up {COMPOSE_SERVICE} (docker-compose.yml as it is, its port published)")
    port = _free_port()
    override = WORK / "compose.image-test.yml"
    override.write_text(json.dumps({"services": {COMPOSE_SERVICE: {"environment": MODEL_ENV}}}, indent=2))
    files = ["-f", str(REPO / "docker-compose.yml")]
    project = [*compose, "--project-name", COMPOSE_PROJECT, "--project-directory", str(REPO)]
    env = {**os.environ, "PUBLISH_PORT": str(port)}
    config = run([*project, *files, "config"], env=env)
    report.check("docker compose config accepts docker-compose.yml",
                 f"{COMPOSE_SERVICE}:" in config.stdout and f"{port}" in config.stdout)
    gpu = run([*project, *files, "--profile", "gpu", "config"], env=env)
    report.check("... and its gpu profile", "crossvit-gpu:" in gpu.stdout)
    files += ["-f", str(override)]
    started = time.monotonic()
    run([*project, *files, "up", "--detach", "--no-build", COMPOSE_SERVICE], log=WORK / "compose-up.log", env=env)
    container = run([*project, *files, "ps", "-q", COMPOSE_SERVICE], env=env).stdout.strip()
    report.check("compose started one container", bool(container) and "\n" not in container, container)
    wait_healthy(cli, container, "compose", started, report)
    check_service(cli, container, "compose", port, report)
    check_stop(cli, container, "compose", [*project, *files, "stop", COMPOSE_SERVICE], report)


def teardown(cli: str, compose: list[str] | None) -> None:
    run([cli, "rm", "--force", "--volumes", CONTAINER], check=False)
    if compose:
        run([*compose, "--project-name", COMPOSE_PROJECT, "--project-directory", str(REPO),
             "-f", str(REPO / "docker-compose.yml"), "down", "--volumes", "--remove-orphans"], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-index-url", default=os.environ.get("IMAGE_TEST_TORCH_INDEX_URL"),
                        help="TORCH_INDEX_URL for the build ('' for PyPI's torch); default: the Dockerfile's "
                             "when it is reachable, else PyPI's")
    parser.add_argument("--rebuild-base", action="store_true", help=f"debootstrap {BASE_IMAGE} even if present")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("image-test needs root (apt-get, dockerd, debootstrap)", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    report = Report()
    started = time.monotonic()
    compose: list[str] | None = None
    failure: str | None = None
    try:
        ensure_packages()
        cli = docker_cli()
        with engine(cli):
            try:
                ensure_base(cli, report, args.rebuild_base)
                build(cli, report, args.torch_index_url)
                teardown(cli, compose_cli(cli))  # leftovers of an interrupted run
                check_image(cli, report)
                docker_run(cli, report)
                compose = compose_cli(cli)
                compose_run(cli, compose, report)
                check_refusals(cli, report)
            finally:
                teardown(cli, compose)
    except (CheckFailed, subprocess.TimeoutExpired, httpx.HTTPError, KeyError, ValueError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    say(f"image-test summary ({time.monotonic() - started:.0f} s in all)")
    for name, value in report.facts:
        print(f"  {name}: {value}")
    if failure:
        print(f"\nFAILED  {failure}")
    print(f"image-test: {report.passed} passed, {1 if failure else 0} failed")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
