"""xllm as a JupyterHub service (``python -m xllm_jupyter.hub``); see docs/jupyterhub.md."""
