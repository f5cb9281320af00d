"""Find a dataset folder, unpacking a local ``.tar.gz`` into a cache when only the archive is there.

Nothing is ever downloaded. The cache is ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``.
Unpacking goes to a temporary folder that is renamed into place, so two processes can race safely.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    d = Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def locate(root, folder: str, archive: str, marker: str, layout: str) -> Path:
    """Return a folder holding ``marker``: ``root`` itself, ``root/folder``, or ``root/archive`` unpacked.

    Raises ``FileNotFoundError`` saying where it looked and what layout it expects.
    """
    root = Path(os.path.expanduser(str(root)))
    for cand in (root, root / folder):
        if (cand / marker).exists():
            return cand
    tar = root / archive if root.is_dir() else (root if root.name == archive else None)
    if tar is not None and tar.is_file():
        return unpack(tar, folder, marker)
    raise FileNotFoundError(
        f"dataset not found: looked for {root / marker}, {root / folder / marker} and {root / archive}. "
        f"Expected layout: {layout}"
    )


def unpack(tar_path: Path, folder: str, marker: str) -> Path:
    st = tar_path.stat()
    target = cache_dir() / f"{folder}-{st.st_size}"
    if (target / folder / marker).exists():
        return target / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=cache_dir()))
    try:
        with tarfile.open(tar_path) as tf:
            tf.extractall(tmp, filter="data")
        if not (tmp / folder / marker).exists():
            raise FileNotFoundError(f"{tar_path}: the archive does not contain {folder}/{marker}")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / folder / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / folder
