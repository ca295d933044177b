"""Notebook API without widgets: ``chat``, ``profile`` and ``compare`` against an xllm server.

The modules import pandas and matplotlib, so ``xllm_jupyter`` exposes them lazily
(``xllm_jupyter.chat`` etc.) and ``import xllm_jupyter`` stays light.
"""
