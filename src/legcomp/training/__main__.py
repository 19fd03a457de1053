"""``python -m legcomp.training`` (also ``torchrun --nproc_per_node=N -m legcomp.training ...``)."""

import sys

from legcomp.training.cli import main

sys.exit(main())
