"""Readers for the AEDAT formats of the public event datasets. Decoding is vectorised numpy.

- **AEDAT 3.1** (DVS128 Gesture): an ASCII header of ``#`` lines ending with ``#!END-HEADER``,
  then packets. Each packet has a 28-byte little-endian header (``eventType:i16, eventSource:i16,
  eventSize:i32, eventTSOffset:i32, eventTSOverflow:i32, eventCapacity:i32, eventNumber:i32,
  eventValid:i32``) and ``eventNumber × eventSize`` bytes of events. Polarity events (type 1,
  8 bytes) are ``data:u32, timestamp:i32`` with ``valid = bit 0``, ``p = bit 1``,
  ``y = bits 2-16``, ``x = bits 17-31``; the full timestamp is ``(eventTSOverflow << 31) | ts``.
  Invalid events and other packet types are skipped (the loop runs over packets, not events).
- **AEDAT 2.0 / jAER** (CIFAR10-DVS): ``#`` header lines, then big-endian ``address:u32,
  timestamp:u32`` pairs. DVS128 addresses: ``x = (a & 0xFE) >> 1``, ``y = (a & 0x7F00) >> 8``,
  ``p = a & 1``.
- **AEDAT 4**: decoded by the optional ``aedat`` package when it is installed.
"""

from __future__ import annotations

import os

import numpy as np

from .events import EventFileError, check_event_file, check_events, make_events

POLARITY_EVENT = 1
PACKET_HEADER = np.dtype([("type", "<i2"), ("source", "<i2"), ("size", "<i4"), ("ts_offset", "<i4"),
                          ("ts_overflow", "<i4"), ("capacity", "<i4"), ("number", "<i4"), ("valid", "<i4")])


def _read(path) -> bytes:
    path = os.fspath(path)
    check_event_file(path)
    with open(path, "rb") as f:
        return f.read()


def _split_header(buf: bytes, path: str, end_marker: bytes | None) -> tuple[list[str], int]:
    """ASCII ``#`` header lines and the offset of the binary body."""
    pos, lines = 0, []
    while pos < len(buf) and buf[pos:pos + 1] == b"#":
        nl = buf.find(b"\n", pos)
        if nl < 0:
            raise EventFileError(f"{path}: header line without end (truncated file?)")
        line = buf[pos:nl + 1]
        lines.append(line.decode("latin-1").strip())
        pos = nl + 1
        if end_marker is not None and line.startswith(end_marker):
            return lines, pos
    if end_marker is not None:
        raise EventFileError(f"{path}: no '{end_marker.decode()}' line: not an AEDAT 3.x file")
    return lines, pos


def read_aedat31(path, sensor_size=(128, 128)) -> np.ndarray:
    """Polarity events of an AEDAT 3.1 file (see module docstring), sorted as recorded."""
    path = os.fspath(path)
    buf = _read(path)
    lines, pos = _split_header(buf, path, b"#!END-HEADER")
    if not lines or not lines[0].startswith("#!AER-DAT3"):
        raise EventFileError(f"{path}: header starts with {lines[0][:20]!r}, expected '#!AER-DAT3.x'")
    parts = []
    n = len(buf)
    while pos < n:
        if pos + 28 > n:
            raise EventFileError(f"{path}: truncated packet header at byte {pos}")
        h = np.frombuffer(buf, PACKET_HEADER, 1, pos)[0]
        size, number = int(h["size"]), int(h["number"])
        if size <= 0 or number < 0:
            raise EventFileError(f"{path}: corrupt packet header at byte {pos} (eventSize {size}, eventNumber {number})")
        body = pos + 28
        end = body + size * number
        if end > n:
            raise EventFileError(f"{path}: packet at byte {pos} needs {size * number} bytes, file has {n - body}")
        if int(h["type"]) == POLARITY_EVENT:
            if size != 8:
                raise EventFileError(f"{path}: polarity packet at byte {pos} has eventSize {size}, expected 8")
            ev = np.frombuffer(buf, np.dtype([("data", "<u4"), ("ts", "<i4")]), number, body)
            keep = (ev["data"] & 1).astype(bool)
            d = ev["data"][keep].astype(np.int64)
            t = (np.int64(int(h["ts_overflow"])) << 31) | ev["ts"][keep].astype(np.int64)
            parts.append(make_events((d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, t, (d >> 1) & 1))
        pos = end
    ev = np.concatenate(parts) if parts else make_events([], [], [], [])
    return check_events(ev, sensor_size, path)


def read_aedat2(path, sensor_size=(128, 128)) -> np.ndarray:
    """DVS128 events of an AEDAT 2.0 / jAER file (see module docstring)."""
    path = os.fspath(path)
    buf = _read(path)
    lines, pos = _split_header(buf, path, None)
    if lines and lines[0].startswith("#!AER-DAT") and not lines[0].startswith("#!AER-DAT2"):
        raise EventFileError(f"{path}: header says {lines[0]!r}; this reader takes AEDAT 2.0 (jAER) files")
    body = len(buf) - pos
    if body % 8:
        raise EventFileError(f"{path}: {body} bytes after the header is not a multiple of 8 "
                             "(address + timestamp per event): truncated or not AEDAT 2.0")
    raw = np.frombuffer(buf, np.dtype([("a", ">u4"), ("t", ">u4")]), body // 8, pos)
    a = raw["a"].astype(np.int64)
    ev = make_events((a & 0xFE) >> 1, (a & 0x7F00) >> 8, raw["t"].astype(np.int64), a & 1)
    return check_events(ev, sensor_size, path)


def read_aedat4(path, sensor_size=None) -> np.ndarray:
    """Polarity events of an AEDAT 4 file, through the optional ``aedat`` package."""
    try:
        import aedat  # type: ignore
    except ImportError as exc:
        raise ImportError(f"reading {os.fspath(path)} (AEDAT 4) needs the optional package 'aedat': "
                          "pip install aedat") from exc
    check_event_file(os.fspath(path))
    parts = []
    for packet in aedat.Decoder(os.fspath(path)):
        if "events" in packet:
            e = packet["events"]
            parts.append(make_events(e["x"], e["y"], e["t"], e["on"].astype(np.int64)))
    ev = np.concatenate(parts) if parts else make_events([], [], [], [])
    return check_events(ev, sensor_size, os.fspath(path)) if sensor_size else ev
