"""The experiment harness of tools/ablate.py: runs (runner.py) and reports (report.py)."""
