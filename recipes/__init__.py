"""Training recipes built from the tokencompress library (run from the repository root)."""
