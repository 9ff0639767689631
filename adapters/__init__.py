"""Grafts of tokencompress compressors and EmbQ onto Hugging Face models."""

# Compressor graft: a TokenCompressor before (or instead of) LLaVA's multimodal projector.
from .compressor_graft import CompressedProjector, CompressorGraft, graft_compressor
from .compressor_graft_io import load_compressor_graft
