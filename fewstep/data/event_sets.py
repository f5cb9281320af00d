"""The event datasets by name and their layouts: ``nmnist``, ``dvs_gesture``, ``cifar10_dvs``, ``ncaltech101``,
and ``eventfolder`` (a user's own recordings, one folder per class, in any format fewstep reads). Each is framed
and cached by :mod:`fewstep.data.event_datasets`; the registry, :class:`~fewstep.data.datasets.DataBundle` and the
validation split are :mod:`fewstep.data.datasets`'.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .archive import cache_dir, locate
from .datasets import DataBundle, carve_val, register


# --------------------------------------------------------------------------------------- N-MNIST
NMNIST_LAYOUT = (
    "either the original N-MNIST folders Train/<class>/*.bin and Test/<class>/*.bin, or the subset "
    "layout nmnist-small/<id>.bs2 with train1K.txt and test100.txt (header '#sample #class', then "
    "'id<TAB>class'), or a folder holding nmnist-small.tar.gz"
)


def _read_id_list(path: Path) -> list[tuple[int, int]]:
    rows = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{ln}: expected 'id<TAB>class', got {line!r}")
        rows.append((int(parts[0]), int(parts[1])))
    return rows


def _nmnist_files(root) -> tuple[list, list]:
    root = Path(os.path.expanduser(str(root)))
    if (root / "Train").is_dir() and (root / "Test").is_dir():
        out = []
        for split in ("Train", "Test"):
            files = [(p, int(p.parent.name)) for p in sorted((root / split).glob("*/*.bin"))]
            if not files:
                raise FileNotFoundError(f"no .bin files under {root / split}/<class>/; expected {NMNIST_LAYOUT}")
            out.append(files)
        return out[0], out[1]
    folder = locate(root, "nmnist-small", "nmnist-small.tar.gz", "train1K.txt", NMNIST_LAYOUT)
    lists = []
    for name in ("train1K.txt", "test100.txt"):
        ids = _read_id_list(folder / name)
        lists.append([(folder / f"{i}.bs2", c) for i, c in ids])
    return lists[0], lists[1]


def _framing(T, by="time", size=None, polarities=2, binarize=False, window_us=None):
    from .event_datasets import Framing

    if T is None:
        raise ValueError("event datasets need T (the number of frames)")
    return Framing(int(T), by, tuple(size) if size else None, int(polarities), bool(binarize), window_us)


MEMORY_SAMPLES = 5000  # event datasets up to this size also keep their frames in memory; larger ones read the disk cache


def _event_bundle(name, train_items, test_items, reader, sensor_size, framing, val_fraction, seed, classes,
                  augment, build=True, memory=False) -> DataBundle:
    from .event_datasets import EventFrames, FileSource

    train = EventFrames(name, FileSource(train_items, reader, sensor_size), framing, memory=memory)
    test = EventFrames(name, FileSource(test_items, reader, sensor_size), framing, memory=memory)
    if build:
        train.build_cache(f"{name} train: framing")
        test.build_cache(f"{name} test: framing")
    tr, va = carve_val(len(train), val_fraction, seed, train.y)
    return DataBundle(name, train.view(tr, augment), train.view(va), test, framing.shape(sensor_size)[1:],
                      len(classes), "frames", T=framing.T, classes=list(classes))


def _augment(augment, max_shift, flip, event_drop, flip_valid):
    from .event_datasets import EventAugment

    if not augment or not (max_shift or (flip and flip_valid) or event_drop):
        return None
    return EventAugment(max_shift, flip and flip_valid, event_drop)


@register("nmnist")
def nmnist(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
           binarize: bool = False, by: str = "time", size=None, polarities: int = 2, window_us=None,
           augment: bool = True, max_shift: int = 0, event_drop: float = 0.0, **_ignored) -> DataBundle:
    """N-MNIST (Orchard et al. 2015), 34×34, 2 polarities, framed per :class:`Framing` (cached on disk).

    Official split (Train/Test), or the subset lists. Flips are not label-preserving for digits.
    """
    from .event_datasets import Item

    framing = _framing(T, by, size, polarities, binarize, window_us)
    train_files, test_files = _nmnist_files(root)
    items = lambda files: [Item(str(p), c) for p, c in files]  # noqa: E731
    return _event_bundle("nmnist", items(train_files), items(test_files), "nmnist", (34, 34), framing, val_fraction,
                         seed, [str(i) for i in range(10)], _augment(augment, max_shift, False, event_drop, False),
                         memory=len(train_files) + len(test_files) <= MEMORY_SAMPLES)


# --------------------------------------------------------------------------------------- DVS128 Gesture
GESTURE_CLASSES = ["hand clap", "right hand wave", "left hand wave", "right arm clockwise",
                   "right arm counter-clockwise", "left arm clockwise", "left arm counter-clockwise", "arm roll",
                   "air drums", "air guitar", "other"]
GESTURE_LAYOUT = ("a folder (or its DvsGesture/ subfolder) of userNN_<lighting>.aedat AEDAT 3.1 recordings, each "
                  "with userNN_<lighting>_labels.csv ('class,startTime_usec,endTime_usec'), and optionally "
                  "trials_to_train.txt / trials_to_test.txt")


def _gesture_items(folder: Path, files: list[Path]) -> list:
    from .event_datasets import Item

    items = []
    for f in files:
        csv = f.with_name(f.stem + "_labels.csv")
        if not csv.is_file():
            raise FileNotFoundError(f"{f}: its labels file {csv.name} is missing; expected {GESTURE_LAYOUT}")
        for ln, line in enumerate(csv.read_text().splitlines(), 1):
            parts = [v.strip() for v in line.split(",")]
            if not line.strip() or not parts[0].lstrip("-").isdigit():
                continue  # header
            if len(parts) != 3:
                raise ValueError(f"{csv}:{ln}: expected 'class,startTime_usec,endTime_usec', got {line!r}")
            c, start, end = (int(v) for v in parts)
            if not 1 <= c <= 11 or end <= start:
                raise ValueError(f"{csv}:{ln}: class {c} must be 1..11 and start < end, got {line!r}")
            items.append(Item(str(f), c - 1, start, end))
    return items


@register("dvs_gesture")
def dvs_gesture(root: str = "../shared/data", T: int = 16, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=None, polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 0, event_drop: float = 0.0, **_ignored) -> DataBundle:
    """DVS128 Gesture (Amir et al. 2017): 11 classes, 128×128. Each recording is cut into its labelled
    gestures. Split: trials_to_train/test.txt when present, else users ≥ 24 are test. No flips (left
    and right arm gestures are different classes)."""
    root = Path(os.path.expanduser(str(root)))
    folder = next((c for c in (root, root / "DvsGesture") if c.is_dir() and any(c.glob("user*.aedat"))), None)
    if folder is None:
        raise FileNotFoundError(f"DVS128 Gesture not found: no user*.aedat in {root} or {root / 'DvsGesture'}; "
                                f"expected {GESTURE_LAYOUT}")
    files = sorted(folder.glob("user*.aedat"))
    lists = [folder / "trials_to_train.txt", folder / "trials_to_test.txt"]
    if all(p.is_file() for p in lists):
        names = [{ln.strip() for ln in p.read_text().splitlines() if ln.strip()} for p in lists]
        train_f = [f for f in files if f.name in names[0]]
        test_f = [f for f in files if f.name in names[1]]
    else:
        import re

        def user(f):
            m = re.match(r"user(\d+)", f.name)
            if not m:
                raise ValueError(f"{f}: cannot read the user number from the file name; expected userNN_<lighting>.aedat")
            return int(m.group(1))

        train_f = [f for f in files if user(f) < 24]
        test_f = [f for f in files if user(f) >= 24]
    framing = _framing(T, by, size, polarities, binarize, window_us)
    return _event_bundle("dvs_gesture", _gesture_items(folder, train_f), _gesture_items(folder, test_f), "aedat31",
                         (128, 128), framing, val_fraction, seed, GESTURE_CLASSES,
                         _augment(augment, max_shift, False, event_drop, False))


# --------------------------------------------------------------------------------------- class-folder datasets
def _class_folder_split(folder: Path, files_of, train_share: float, name: str):
    """Per class (sub-folder with files, sorted), the first ``train_share`` of the sorted files ``files_of(dir)``
    train, the rest test. The split is written to ``$FEWSTEP_CACHE/splits/`` and returned."""
    from .event_datasets import Item

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and files_of(d))
    train, test, record = [], [], {}
    for c, cls in enumerate(classes):
        files = files_of(folder / cls)
        k = min(len(files) - 1, int(round(train_share * len(files)))) if len(files) > 1 else len(files)
        train += [Item(str(f), c) for f in files[:k]]
        test += [Item(str(f), c) for f in files[k:]]
        record[cls] = {"train": [f.name for f in files[:k]], "test": [f.name for f in files[k:]]}
    split_dir = cache_dir() / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    path = split_dir / f"{name}-{key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"root": str(folder), "train_share": train_share, "classes": record}, indent=1))
    os.replace(tmp, path)
    return classes, train, test, path


def _glob(pattern: str):
    return lambda d: sorted(d.glob(pattern))


def _find_class_root(root, subdirs, pattern, layout, what):
    root = Path(os.path.expanduser(str(root)))
    for cand in [root] + [root / s for s in subdirs]:
        if cand.is_dir() and any(cand.glob(f"*/{pattern}")):
            return cand
    raise FileNotFoundError(f"{what} not found: no <class>/{pattern} under {root} or "
                            f"{', '.join(str(root / s) for s in subdirs)}; expected {layout}")


@register("cifar10_dvs")
def cifar10_dvs(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=(48, 48), polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 5, flip: bool = True, event_drop: float = 0.0,
                **_ignored) -> DataBundle:
    """CIFAR10-DVS (Li et al. 2017): 10 × 1000 AEDAT 2.0 recordings (DVS128), split 90/10 per class
    deterministically (sorted file names; recorded in ``$FEWSTEP_CACHE/splits``). Default size 48×48."""
    folder = _find_class_root(root, ["CIFAR10DVS", "cifar10_dvs", "CIFAR10-DVS"], "*.aedat",
                              "<class>/*.aedat folders (airplane, automobile, ...)", "CIFAR10-DVS")
    classes, train, test, split_file = _class_folder_split(folder, _glob("*.aedat"), 0.9, "cifar10_dvs")
    b = _event_bundle("cifar10_dvs", train, test, "cifar10dvs", (128, 128), _framing(T, by, size, polarities, binarize,
                      window_us), val_fraction, seed, classes, _augment(augment, max_shift, flip, event_drop, True))
    b.split_file = str(split_file)
    return b


NCALTECH_SENSOR = (240, 180)  # the ATIS's width and height (N-Caltech101's recordings reach up to it)


@register("ncaltech101")
def ncaltech101(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=(48, 48), polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 5, flip: bool = True, event_drop: float = 0.0,
                sensor_size=NCALTECH_SENSOR, **_ignored) -> DataBundle:
    """N-Caltech101 (Orchard et al. 2015): <class>/*.bin in the N-MNIST 40-bit format on an ATIS of up to
    240×180. Every class folder is used (BACKGROUND_Google too when present); split 90/10 per class
    deterministically (sorted file names; recorded in ``$FEWSTEP_CACHE/splits``). Default size 48×48."""
    folder = _find_class_root(root, ["Caltech101", "N-Caltech101", "ncaltech101"], "*.bin",
                              "<class>/image_NNNN.bin folders", "N-Caltech101")
    classes, train, test, split_file = _class_folder_split(folder, _glob("*.bin"), 0.9, "ncaltech101")
    b = _event_bundle("ncaltech101", train, test, "nmnist", tuple(sensor_size), _framing(T, by, size, polarities,
                      binarize, window_us), val_fraction, seed, classes,
                      _augment(augment, max_shift, flip, event_drop, True))
    b.split_file = str(split_file)
    return b


# --------------------------------------------------------------------------------------- your own recordings
def _recordings(folder: Path) -> list[Path]:
    from .event_datasets import recordings_in

    return recordings_in(folder)


def _eventfolder_layout() -> str:
    from .event_datasets import FORMATS

    return ("train/<class>/<recording> and test/<class>/<recording> with the same class folders, or <class>/<recording> "
            f"alone (then the first 90 % of each class's sorted files train, the rest test); recordings as {FORMATS}")


def _class_items(folder: Path, classes: list[str]) -> list:
    from .event_datasets import Item

    items = []
    for c, cls in enumerate(classes):
        files = _recordings(folder / cls)
        if not files:
            raise FileNotFoundError(f"eventfolder: {folder / cls} holds no recordings; expected {_eventfolder_layout()}")
        items += [Item(str(f), c) for f in files]
    return items


def _sensor_hint(items) -> str:
    """Where the first recording's events reach, to help choose ``data.sensor_size``."""
    from .event_datasets import READERS

    try:
        ev = READERS["auto"](items[0].path, (65536, 65536))
        return f"; {items[0].path}'s events reach x = {int(ev['x'].max())}, y = {int(ev['y'].max())}"
    except Exception:  # the hint is a courtesy: the file's own error comes when it is framed
        return ""


@register("eventfolder")
def eventfolder(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
                sensor_size=None, binarize: bool = False, by: str = "time", size=None, polarities: int = 2,
                window_us=None, augment: bool = True, max_shift: int = 0, event_drop: float = 0.0,
                **_ignored) -> DataBundle:
    """Your own recordings, one folder per class (the event counterpart of ``imagefolder``):
    ``train/<class>/*`` and ``test/<class>/*``, or ``<class>/*`` alone, split 90/10 per class (sorted file names;
    recorded in ``$FEWSTEP_CACHE/splits``). Each file is read by its format (:func:`~fewstep.data.event_datasets.
    reader_for`): N-MNIST's 40-bit events, AEDAT 2.0/3.1/4, numpy ``x, y, t, p``; formats may be mixed.
    ``sensor_size = [width, height]`` is required: no format stores it reliably, and frames must not depend on
    where a recording's events happen to reach. Classes are the sorted folder names. Horizontal flips are never
    applied (fewstep cannot know whether a mirrored recording keeps its label): ``max_shift`` and ``event_drop``
    augment."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"eventfolder: {root} is not a folder; expected {_eventfolder_layout()}")
    split_file = None
    if (root / "train").is_dir() and (root / "test").is_dir():
        names = [sorted(d.name for d in (root / s).iterdir() if d.is_dir()) for s in ("train", "test")]
        if names[0] != names[1]:
            only = [sorted(set(names[i]) - set(names[1 - i])) for i in (0, 1)]
            raise ValueError(f"eventfolder: {root}/train and {root}/test must hold the same class folders; only in "
                             f"train: {', '.join(only[0]) or 'none'}; only in test: {', '.join(only[1]) or 'none'}")
        if not names[0]:
            raise FileNotFoundError(f"eventfolder: no class folders in {root / 'train'}; expected "
                                    f"{_eventfolder_layout()}")
        classes = names[0]
        train, test = _class_items(root / "train", classes), _class_items(root / "test", classes)
    else:
        classes, train, test, split_file = _class_folder_split(root, _recordings, 0.9, "eventfolder")
        if not classes:
            raise FileNotFoundError(f"eventfolder: no class folders with recordings in {root}; expected "
                                    f"{_eventfolder_layout()}")
    if sensor_size is None:
        raise ValueError("eventfolder needs data.sensor_size, the sensor's [width, height] (e.g. [34, 34] for "
                         f"N-MNIST's ATIS crop, [128, 128] for a DVS128){_sensor_hint(train)}")
    b = _event_bundle("eventfolder", train, test, "auto", tuple(int(v) for v in sensor_size),
                      _framing(T, by, size, polarities, binarize, window_us), val_fraction, seed, classes,
                      _augment(augment, max_shift, False, event_drop, False),
                      memory=len(train) + len(test) <= MEMORY_SAMPLES)
    b.split_file = None if split_file is None else str(split_file)
    return b


# dataset -> (event reader, sensor size (W, H)) of the recordings it is built from, for reading one recording as the
# dataset does (fewstep stream); None: the run's data.sensor_size. Every name in datasets.EVENT_DATASETS is here.
SOURCES = {
    "nmnist": ("nmnist", (34, 34)),
    "dvs_gesture": ("aedat31", (128, 128)),
    "cifar10_dvs": ("cifar10dvs", (128, 128)),
    "ncaltech101": ("nmnist", NCALTECH_SENSOR),
    "eventfolder": ("auto", None),
}
