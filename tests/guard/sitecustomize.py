"""Started with every Python process that has this folder on PYTHONPATH: installs the collective
device guard (collective_guard.py) when INSTRUCTRETRO_COLLECTIVE_GUARD=1."""

import os

if os.environ.get("INSTRUCTRETRO_COLLECTIVE_GUARD") == "1":
    import collective_guard

    collective_guard.install()
