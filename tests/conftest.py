import sys
from pathlib import Path

# tests/ helpers (naive reference, fixtures) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
