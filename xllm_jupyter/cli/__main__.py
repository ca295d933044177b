"""`python -m xllm_jupyter.cli`: the same as the `xllm` command."""

from .main import main

main(prog_name="xllm")
