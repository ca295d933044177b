"""The ``POST /v1/embeddings`` route's request logic (see ``openai/embeddings.py``)."""

from __future__ import annotations

from ..openai.embeddings import create_embeddings
from .handlers import BodyMixin


class EmbeddingsMixin(BodyMixin):
    """``POST /v1/embeddings``."""

    async def handle_post(self) -> None:
        """Embed the inputs and reply with the OpenAI list object."""
        await self.respond(create_embeddings(self.xllm.engine, self.body, manages=self.caller.admin,
                                             user=self.caller.user))
