"""Grafts of tokencompress compressors and EmbQ onto Hugging Face models."""
