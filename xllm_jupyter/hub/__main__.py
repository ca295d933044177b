"""``python -m xllm_jupyter.hub``: the xllm JupyterHub service (the ``command`` of a managed service)."""

from __future__ import annotations

import asyncio
import sys

from ..core.config import load_config
from ..core.errors import XllmError


def main() -> int:
    """Serve until the hub stops us; config from config.yaml and ``XLLM_*`` as for ``xllm serve``."""
    from ..server.logging_setup import setup_logging
    from .service import run_hub_service

    try:
        config = load_config()
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
