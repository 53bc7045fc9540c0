"""`crossvit-weights fetch / verify / list`: get the published checkpoints and check the local ones."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from model.checkpoint import CheckpointError, file_sha256
from model.crossvit import CrossViT
from model.variants import OFFICIAL_RELEASE, get_variant, list_variants

from .fetch import FetchError, fetch, verify_checkpoint
from .store import ManifestError, find_local, read_manifest

__all__ = ["default_weights_dir", "main"]

logger = logging.getLogger("weights.cli")

WEIGHTS_DIR_ENV = "CROSSVIT_WEIGHTS_DIR"  # the server's setting, so both agree on where checkpoints live


def default_weights_dir() -> Path:
    """$CROSSVIT_WEIGHTS_DIR when set (as in the container image), else the package's own `weights/` folder."""
    configured = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parent


def _variant_name(value: str) -> str:
    try:
        return get_variant(value).name
    except KeyError as exc:
        raise argparse.ArgumentTypeError(str(exc.args[0])) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossvit-weights",
        description="Fetch, verify and list CrossViT checkpoints. "
        f"DIR defaults to ${WEIGHTS_DIR_ENV}, else the package's weights/ folder ({default_weights_dir()}).",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fetch,verify,list}")

    p = commands.add_parser("fetch", help="download a variant's published checkpoint, check it loads, record it")
    p.add_argument("variant", type=_variant_name, help="timm name or alias, e.g. crossvit_18_dagger_240")
    p.add_argument("--dest", type=Path, default=None, metavar="DIR", help="weights folder to fetch into")
    p.add_argument("--source", choices=["hub", "official"], default="hub",
                   help="hub: timm's safetensors on the Hugging Face hub (default); official: the IBM release .pth")
    p.add_argument("--repo", default=None, metavar="REPO_ID", help="hub repo to fetch from (default: timm's)")
    p.add_argument("--official-base-url", default=OFFICIAL_RELEASE, metavar="URL",
                   help="where the official .pth files live (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser("verify", help="re-check every manifest entry's sha256 and that it loads")
    p.add_argument("dir", type=Path, nargs="?", default=None, metavar="DIR")

    p = commands.add_parser("list", help="the published variants and which are present locally")
    p.add_argument("--dir", type=Path, default=None, metavar="DIR")
    p.add_argument("variants", type=_variant_name, nargs="*", metavar="VARIANT", help="only these (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.log_level != "debug":
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.command == "fetch":
            return _fetch(args)
        if args.command == "verify":
            return _verify(args.dir or default_weights_dir())
        return _list(args.dir or default_weights_dir(), args.variants or list_variants())
    except (FetchError, ManifestError) as exc:
        logger.error("%s", exc)
        return 1


def _fetch(args: argparse.Namespace) -> int:
    path = fetch(
        args.variant,
        args.dest or default_weights_dir(),
        source=args.source,
        progress=not args.no_progress,
        repo_id=args.repo,
        official_base_url=args.official_base_url,
    )
    entry = read_manifest(path.parent)[args.variant]
    sys.stdout.write(f"{args.variant}: {path} (sha256 {entry.sha256}, {entry.size} bytes)\n")
    return 0


def _verify(weights_dir: Path) -> int:
    entries = read_manifest(weights_dir)
    if not entries:
        sys.stdout.write(f"no manifest entries in {weights_dir}; nothing to verify\n")
        return 0
    failed = []
    for name, entry in entries.items():
        path = weights_dir / entry.file
        if not path.is_file():
            problem = f"{path} is missing"
        elif (sha256 := file_sha256(path)) != entry.sha256:
            problem = f"{path} has sha256 {sha256}, the manifest records {entry.sha256}"
        else:
            try:
                verify_checkpoint(name, path)
                problem = ""
            except (KeyError, CheckpointError) as exc:  # a variant this version does not know, a bad file
                problem = f"{path} does not load: {exc}"
        if problem:
            failed.append(name)
            sys.stdout.write(f"FAILED {name}: {problem}\n")
        else:
            sys.stdout.write(f"ok     {name}: {path} (sha256 {entry.sha256[:12]})\n")
    if failed:
        logger.error("%d of %d checkpoints failed verification: %s", len(failed), len(entries), ", ".join(failed))
        return 1
    return 0


def _list(weights_dir: Path, variants: Sequence[str]) -> int:
    manifest = read_manifest(weights_dir)
    header = ("variant", "params", "fp32 MB", "paper top-1", "local")
    rows = [header]
    for name in variants:
        v = get_variant(name)
        params = sum(p.numel() for p in CrossViT(v.config).parameters())
        local = find_local(name, weights_dir)
        if local is None:
            present = "-"
        else:
            entry = manifest.get(v.name)
            recorded = entry is not None and weights_dir / entry.file == local
            sha256 = entry.sha256 if entry is not None and recorded else file_sha256(local)
            present = f"{local.name} sha256:{sha256[:12]}" + ("" if recorded else " (not in manifest)")
        rows.append((v.name, f"{params / 1e6:.1f}M", f"{params * 4 / 1e6:.0f}", f"{v.paper_top1:.1f}", present))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
