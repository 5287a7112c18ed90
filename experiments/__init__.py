"""absl-flag experiment scripts (run as `python -m experiments.NAME`)."""
