"""``python -m mrplab``: the same command as ``mrplab``."""

from mrplab.cli import app

if __name__ == "__main__":
    app(prog_name="mrplab")
