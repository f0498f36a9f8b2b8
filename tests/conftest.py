import os
import sys

# Tests import small helpers (such as npz_factory) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
