"""``python -m mmelkit``: the same as the ``mmelkit`` command."""

from mmelkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
