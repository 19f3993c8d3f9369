"""`python -m apibox` runs the same CLI as the `apibox` console script."""

from apibox.cli.main import run

if __name__ == "__main__":
    run()
