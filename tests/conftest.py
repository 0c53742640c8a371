"""Shared pytest settings: the project root is importable without installing it.

The root goes to the end of sys.path, so an installed broker (the VM tests
run against the one scripts/install put in /opt/broker) takes precedence.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)
