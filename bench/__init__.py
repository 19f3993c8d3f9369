"""apibox's own benchmark: `bench/run.sh` or `python -m bench` (see bench/README.md)."""
