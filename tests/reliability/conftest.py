"""The reliability suites' shared set-up; their marker and summary live in summary.py."""
