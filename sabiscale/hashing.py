"""Content hashes, in one place: shards, manifests, tokenizers and checkpoint files are all
identified by the sha256 of their bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (shards and checkpoint files can be large)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of many files at once: hashlib releases the GIL while it hashes, so threads hash a
    large checkpoint's files in parallel (rank 0 hashes while the other ranks wait in a collective)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))
