"""Grafts of tokencompress compressors and EmbQ onto Hugging Face models."""

# Compressor graft: a TokenCompressor before (or instead of) LLaVA's multimodal projector.
from .compressor_graft import CompressedProjector, CompressorGraft, graft_compressor
from .compressor_graft_io import load_compressor_graft

# EmbQ graft: FlashSloth's query tokens and EmbQ inside the LLM, and prompts that place them.
from .embq import EmbQGraft, graft_embq
from .embq_io import load_embq_graft
from .prompt import EncodedPrompt, QueryBlock, build_prompt, chat_template, pad_prompts, vicuna_v1

# Several grafts on one model: saved and loaded together.
from .grafts_io import load_grafted, save_grafted

# Qwen2-VL and Qwen2.5-VL: graft_compressor and graft_embq hand these models to these.
from .qwen2_vl import Qwen2VLCompressorGraft, graft_qwen2_vl_compressor
from .qwen2_vl_embq import Qwen2VLEmbQGraft, graft_qwen2_vl_embq
