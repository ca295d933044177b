"""Stands exllamav3's compiled module in for every Python process started with this folder on PYTHONPATH
(``api_check.sh``), so that child processes the checks start (gpu_serving.py's server, a cold first load) import
the library as the test process does (``exllama_ext_stand_in``)."""

import exllama_ext_stand_in  # noqa: F401
