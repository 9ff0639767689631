"""`python -m tokencompress ...`: the same as the `tokencompress` console command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
