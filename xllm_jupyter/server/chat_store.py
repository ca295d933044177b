"""Route mixins for stored chat completions: retrieve, update, delete, list messages (openai/chat_store.py)."""

from __future__ import annotations

from .handlers import BodyMixin, RequestMixin


class StoredCompletionMixin(BodyMixin):
    """``GET``, ``POST`` (update metadata) and ``DELETE /v1/chat/completions/{id}``."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "POST", "DELETE")

    async def handle_get(self, completion_id: str) -> None:
        """A stored chat completion; 404 when unknown."""
        await self.write_large_json(self.xllm.serving.stored.retrieve(completion_id, user=self.caller.user))

    async def handle_post(self, completion_id: str) -> None:
        """Replace its metadata (``{"metadata": {...}}``); the updated completion."""
        await self.write_large_json(await self.xllm.serving.stored.update(completion_id, self.body, user=self.caller.user))

    async def handle_delete(self, completion_id: str) -> None:
        """Forget a stored chat completion; 404 when unknown."""
        self.write_json(self.xllm.serving.stored.delete(completion_id, user=self.caller.user))


class StoredCompletionMessagesMixin(RequestMixin):
    """``GET /v1/chat/completions/{id}/messages``."""

    async def handle_get(self, completion_id: str) -> None:
        """One page of the stored request's messages (``after``, ``limit``, ``order``)."""
        self.write_json(self.xllm.serving.stored.messages(completion_id, self.query, user=self.caller.user))
