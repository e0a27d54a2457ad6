"""The MPI suite shares tests/helpers.py with the single-process tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
