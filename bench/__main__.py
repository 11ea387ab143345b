"""``python -m bench [--only ROW ...] [--quick] [--threads N] [--out DIR] [--images N] [--size PX]``."""
import sys

from bench.cli import main

sys.exit(main())
