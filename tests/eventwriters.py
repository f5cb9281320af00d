"""Small writers for the event formats, used by the tests to build files and read them back."""

import numpy as np

from fewstep.data.aedat import PACKET_HEADER


def write_aedat31(path, ev, packet_size=1000, invalid_every=0, extra_packet=True):
    out = [b"#!AER-DAT3.1\r\n", b"#Format: RAW\r\n", b"#Source 1: DVS128\r\n", b"#!END-HEADER\r\n"]
    t = ev["t"].astype(np.int64)
    # packets hold at most packet_size events and never straddle a timestamp overflow (as libcaer writes them)
    cuts = sorted(set(range(0, len(ev), packet_size)) | set(np.flatnonzero(np.diff(t >> 31)) + 1) | {len(ev)})
    for start, stop in zip(cuts[:-1], cuts[1:]):
        sl = slice(start, stop)
        overflow = int(t[sl][0] >> 31)
        data = ((ev["x"][sl].astype(np.uint32) << 17) | (ev["y"][sl].astype(np.uint32) << 2)
                | (ev["p"][sl].astype(np.uint32) << 1) | 1)
        body = np.empty(len(data), np.dtype([("data", "<u4"), ("ts", "<i4")]))
        body["data"], body["ts"] = data, (t[sl] & 0x7FFFFFFF)
        if invalid_every:
            extra = np.zeros(1, body.dtype)
            extra["data"], extra["ts"] = (5 << 17) | (5 << 2), 0  # valid bit 0: must be skipped
            body = np.concatenate([body, extra])
        h = np.zeros(1, PACKET_HEADER)
        h["type"], h["size"], h["ts_overflow"] = 1, 8, overflow
        h["capacity"] = h["number"] = len(body)
        h["valid"] = len(data)
        out += [h.tobytes(), body.tobytes()]
        if extra_packet:  # a special-event packet the reader must skip
            s = np.zeros(1, PACKET_HEADER)
            s["type"], s["size"], s["number"], s["capacity"] = 0, 8, 2, 2
            out += [s.tobytes(), bytes(16)]
    with open(path, "wb") as f:
        f.write(b"".join(out))


def write_aedat2(path, ev):
    raw = np.empty(len(ev), np.dtype([("a", ">u4"), ("t", ">u4")]))
    raw["a"] = (ev["y"].astype(np.uint32) << 8) | (ev["x"].astype(np.uint32) << 1) | ev["p"].astype(np.uint32)
    raw["t"] = ev["t"]
    with open(path, "wb") as f:
        f.write(b"#!AER-DAT2.0\r\n# This is a raw AE data file\r\n" + raw.tobytes())
