"""``python -m xllm_jupyter.hub`` (or ``xllm hub-service``): the xllm JupyterHub service.

This is the ``command`` of a managed service in ``jupyterhub_config.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from ..core.errors import XllmError

DESCRIPTION = (
    "Serve xllm's OpenAI-compatible API as a JupyterHub service until the hub stops it. "
    "The hub sets JUPYTERHUB_SERVICE_URL, JUPYTERHUB_API_TOKEN and JUPYTERHUB_SERVICE_PREFIX; "
    "everything else comes from config.yaml (XLLM_CONFIG, else <XLLM_HOME>/config.yaml) and "
    "XLLM_* variables, as for `xllm serve`. See docs/jupyterhub.md."
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The service's command line (``--help`` only: it is configured by config and environment)."""
    return argparse.ArgumentParser(prog=prog or "python -m xllm_jupyter.hub", description=DESCRIPTION)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Serve until the hub stops us; config from config.yaml and ``XLLM_*`` as for ``xllm serve``."""
    build_parser(prog).parse_args(argv)
    from ..server.logging_setup import setup_logging
    from .service import load_hub_config, run_hub_service

    try:
        config = load_hub_config()  # the hub's defaults (reserve_when_alone) under config.yaml and XLLM_*
        setup_logging(config.http)
        asyncio.run(run_hub_service(config))
    except XllmError as exc:
        print(f"xllm hub service: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
