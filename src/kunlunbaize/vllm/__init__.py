"""Serving `kunlun export --hf` folders on vLLM: an out-of-tree model plugin (needs vLLM installed)."""
