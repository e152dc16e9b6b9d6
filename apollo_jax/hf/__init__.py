"""Hugging Face interop: config mapping, checkpoint import, upcycling, export, safetensors, tokenizer."""
