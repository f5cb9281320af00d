"""Event decoding and framing throughput on the 10 real DVS128 Gesture clips (../shared/data).

Prints events decoded per second (the 40-bit reader, and the AEDAT 3.1 reader on the same events
re-encoded) and frames built per second ([T, 2, 128, 128], equal-time bins), medians of 5 runs.

    .venv/bin/python bench/events.py [--data ../shared/data] [--T 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fewstep.data import read_nmnist  # noqa: E402
from fewstep.data.aedat import read_aedat31  # noqa: E402
from fewstep.data.event_datasets import Framing, frame_events  # noqa: E402


def timed(fn, repeats=5):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--T", type=int, default=16)
    args = p.parse_args()
    arch = Path(args.data) / "dvs-gesture-clips.tar.gz"
    if not arch.is_file():
        sys.exit(f"{arch} not found: this benchmark needs the real DVS128 Gesture clips")
    from eventwriters import write_aedat31

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(arch) as tf:
            tf.extractall(tmp, filter="data")
        files = sorted(Path(tmp, "dvs-gesture-clips").glob("*.bs2"), key=lambda f: int(f.stem))
        t_dec, evs = timed(lambda: [read_nmnist(f, (128, 128)) for f in files])
        n = sum(len(e) for e in evs)
        for f, e in zip(files, evs):
            write_aedat31(f.with_suffix(".aedat"), e)
        t_a3, _ = timed(lambda: [read_aedat31(f.with_suffix(".aedat")) for f in files])
        fr = Framing(args.T)
        t_fr, frames = timed(lambda: [frame_events(e, (128, 128), fr) for e in evs])
        fr48 = Framing(args.T, size=(48, 48))
        t_fr48, _ = timed(lambda: [frame_events(e, (128, 128), fr48) for e in evs])
    assert all(f.sum() == len(e) for f, e in zip(frames, evs))
    print(f"{len(files)} real DVS128 Gesture clips, {n:,} events in all")
    print(f"decode 40-bit (.bs2):     {n / t_dec / 1e6:7.1f} M events/s  ({t_dec * 1e3:.1f} ms)")
    print(f"decode AEDAT 3.1:         {n / t_a3 / 1e6:7.1f} M events/s  ({t_a3 * 1e3:.1f} ms)")
    print(f"frame to [{args.T}, 2, 128, 128]: {len(files) * args.T / t_fr:7.0f} frames/s, "
          f"{len(files) / t_fr:.0f} samples/s ({n / t_fr / 1e6:.1f} M events/s)")
    print(f"frame to [{args.T}, 2, 48, 48]:   {len(files) * args.T / t_fr48:7.0f} frames/s, "
          f"{len(files) / t_fr48:.0f} samples/s")


if __name__ == "__main__":
    main()
