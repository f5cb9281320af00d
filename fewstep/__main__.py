"""``python -m fewstep`` (what ``torchrun ... -m fewstep train CONFIG --out DIR`` runs)."""

import sys

from .cli import main

sys.exit(main())
