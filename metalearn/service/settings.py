"""The server's settings: folders, queue width, token and input limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """What ``serve.py``'s flags decide; folders are absolute so jobs do not depend on cwd."""

    work_dir: Path
    data_dir: Path
    jobs: int = 1
    token: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 1024 * 1024
    max_image_side: int = 512
    # Uploads for image-folder runs are photos as they are: larger files, checked the same way.
    max_upload_bytes: int = 4 * 1024 * 1024
    max_upload_side: int = 4096
    max_support: int = 100
    max_query: int = 50
    adapt_waiting: int = 8

    @classmethod
    def create(cls, work_dir: str | Path, data_dir: str | Path, **options) -> Settings:
        return cls(Path(work_dir).resolve(), Path(data_dir).resolve(), **options)
