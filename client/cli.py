"""crossvit-classify: classify every image under some folders into a JSON Lines or CSV file.

Writes each result as it arrives, resumes by skipping files already classified in the output,
records per-file errors there, and exits 1 when any file failed (2 when it could not run at all).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .api import DEFAULT_URL, AsyncClient
from .batching import Limits, plan_batches
from .errors import APIError, ClientError, UnreachableError
from .output import OutputError, ResultsFile
from .retry import RetryEvent, RetryPolicy
from .walk import find_images
from .wire import ImageResultModel

__all__ = ["main"]

EXIT_FAILED_FILES, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 1, 2, 130
FATAL_STATUSES = frozenset({400, 401, 403, 404, 405})  # a wrong URL, key or request: every file would fail
SHOWN_FAILURES = 20


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


@dataclass
class Run:
    found: int = 0
    skipped: int = 0
    classified: int = 0
    failures: list[tuple[str, ClientError]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def summary(self, out: Path | None, interrupted: bool) -> str:
        elapsed = time.monotonic() - self.started
        done = self.classified + len(self.failures)
        where = f" (already in {out.name})" if out is not None else ""
        lines = [
            f"crossvit-classify: {self.classified} classified, {len(self.failures)} failed, "
            f"{self.skipped} skipped{where}, {self.found} found, in {elapsed:.1f} s "
            f"({done / elapsed if elapsed > 0 else 0:.1f} images/s)" + (" - interrupted" if interrupted else "")
        ]
        lines += [f"  failed: {path}: {error.code}: {error.message}" for path, error in self.failures[:SHOWN_FAILURES]]
        if len(self.failures) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(self.failures) - SHOWN_FAILURES} more; see the output")
        return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossvit-classify", description=__doc__.split("\n\n")[0],
        epilog="Environment: CROSSVIT_URL, CROSSVIT_API_KEY. Exit status: 0 all classified, 1 some files "
               "failed (see the output), 2 could not run, 130 interrupted (run again to resume).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (walked for images)")
    parser.add_argument("--url", default=os.environ.get("CROSSVIT_URL", DEFAULT_URL),
                        help="the server (default: $CROSSVIT_URL or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("CROSSVIT_API_KEY"),
                        help="Bearer key when the server requires one (default: $CROSSVIT_API_KEY)")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per image (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="results.jsonl or results.csv (appended, resumable); "
                                                 "default: JSON Lines on stdout")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=RetryPolicy.retries,
                        help="retries of a 503 or lost connection per request (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when not a terminal)")
    return parser


async def _classify(args: argparse.Namespace, todo: list[Path], results: ResultsFile, run: Run) -> None:
    def on_retry(event: RetryEvent) -> None:
        _say(f"retry {event.attempt} in {event.delay_s:.1f} s: {event.reason}")

    async with AsyncClient(args.url, api_key=args.api_key, retry=RetryPolicy(retries=args.retries),
                           on_retry=on_retry) as client:
        limits = await client.limits()
        per_request = min(limits.max_images_per_request, max(1, math.ceil(len(todo) / args.concurrency)))
        limits = Limits(per_request, limits.max_upload_bytes)  # a few files still fill every request slot
        sizes = [(p.name, p.stat().st_size if p.is_file() else 0) for p in todo]
        batches = deque([todo[i] for i in indices] for indices in plan_batches(sizes, limits))
        with tqdm(total=len(todo), unit="img", desc="classify", file=sys.stderr, dynamic_ncols=True,
                  disable=True if args.no_progress else None) as progress:

            async def work() -> None:
                while batches:
                    batch = batches.popleft()
                    try:
                        outcomes = await client.classify_each(batch, top_k=args.top_k)
                    except APIError as exc:
                        if exc.status in FATAL_STATUSES:
                            raise
                        outcomes = [exc] * len(batch)  # e.g. 503 after every retry, 504: each file failed
                    for path, outcome in zip(batch, outcomes, strict=True):
                        results.write(str(path), outcome)
                        if isinstance(outcome, ImageResultModel):
                            run.classified += 1
                        else:
                            run.failures.append((str(path), outcome))
                    progress.update(len(batch))

            workers = [asyncio.create_task(work()) for _ in range(args.concurrency)]
            try:
                await asyncio.gather(*workers)  # the first fatal error ends the run ...
            finally:
                for task in workers:  # ... and the requests still in flight
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.concurrency < 1 or args.retries < 0:
        _say("crossvit-classify: --top-k and --concurrency must be >= 1, --retries >= 0")
        return EXIT_CANNOT_RUN
    images, missing = find_images(args.paths)
    if missing:
        _say("crossvit-classify: no such file or folder: " + ", ".join(map(str, missing)))
        return EXIT_CANNOT_RUN
    try:
        results = ResultsFile(args.out, args.top_k)
    except (OutputError, OSError) as exc:
        _say(f"crossvit-classify: {exc}")
        return EXIT_CANNOT_RUN
    todo = [p for p in images if str(p) not in results.done]
    run = Run(found=len(images), skipped=len(images) - len(todo))
    interrupted = False
    try:
        asyncio.run(_classify(args, todo, results, run))
    except KeyboardInterrupt:
        interrupted = True
    except (APIError, UnreachableError) as exc:
        _say(f"crossvit-classify: {exc}")
        return EXIT_CANNOT_RUN
    finally:
        results.close()
        _say(run.summary(args.out, interrupted))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_FILES if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
