"""``python -m mrplab``: the same command as ``mrplab``."""

from mrplab.cli import main

if __name__ == "__main__":
    main()
