"""The `xllm` command line (click): serve, pull, list, show, rm, run, ps, stop."""
