"""Put SEG/ and the repository root on sys.path and patch the mmcv/mmseg stack before anything
imports mmseg (SEG/mmseg_compat.py). Imported first by train.py and test.py."""
import os
import sys

SEG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(SEG_DIR)
for path in (REPO_ROOT, SEG_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import mmseg_compat  # noqa: E402,F401
