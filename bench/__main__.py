"""``python -m bench``: the benchmark suite (bench/run.py)."""

import sys
from pathlib import Path

# The bench modules import each other as siblings (``from common import ...``), as the scripts always have.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main  # noqa: E402

sys.exit(main())
