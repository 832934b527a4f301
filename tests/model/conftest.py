import sys
from pathlib import Path

# The tests run in importlib mode (pyproject), which puts no test directory on sys.path; the test
# modules here import training_helpers.
sys.path.insert(0, str(Path(__file__).parent))
