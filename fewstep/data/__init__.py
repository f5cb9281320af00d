"""Event I/O, framing, encodings and datasets."""

from .events import EVENT_DTYPE, EventFileError, decode_nmnist, make_events, read_nmnist, write_nmnist  # noqa: F401
from .frames import to_frames  # noqa: F401
from .encoding import direct, poisson  # noqa: F401
from .datasets import DATASETS, DataBundle, available, load  # noqa: F401
