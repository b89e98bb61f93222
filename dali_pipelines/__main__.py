"""``python -m dali_pipelines {pack,synth} ...``."""

import sys

from .cli import main

sys.exit(main())
