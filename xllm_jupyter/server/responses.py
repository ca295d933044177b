"""Route mixins for the Responses API: create, count input tokens, retrieve, delete, cancel, list input items (compact: refused)."""

from __future__ import annotations

from ..core.errors import NotFound
from .handlers import BodyMixin, RequestMixin
from .sse import typed_sse_event


class ResponsesMixin(BodyMixin):
    """``POST /v1/responses``."""

    async def handle_post(self) -> None:
        """Create a response, streamed as typed events (``event:`` lines, no ``[DONE]``) or not."""
        await self.respond(self.xllm.responses.create(self.body, user=self.caller.user), encode=typed_sse_event, done=b"")


class ResponseInputTokensMixin(BodyMixin):
    """``POST /v1/responses/input_tokens``."""

    async def handle_post(self) -> None:
        """The prompt tokens a create with this body would have (``usage.input_tokens``); nothing is generated."""
        await self.respond(self.xllm.responses.input_tokens(self.body, user=self.caller.user))


class ResponseCompactMixin(BodyMixin):
    """``POST /v1/responses/compact`` (the SDK's ``responses.compact``): not served, said plainly (it was a 405,
    the id route taking "compact" for a response id)."""

    async def handle_post(self) -> None:
        """404 naming what to use instead."""
        raise NotFound("Compaction (POST /v1/responses/compact) is not supported by this server; "
                       "truncation: 'auto' on responses.create drops the oldest input items instead.",
                       code="unsupported_endpoint")


def include_values(handler: RequestMixin) -> list[str]:
    """Every ``include`` query value (the openai SDK sends ``include[]=a&include[]=b``; ``query`` keeps one of each)."""
    return handler.get_query_arguments("include[]") + handler.get_query_arguments("include")  # type: ignore[attr-defined]


class ResponseMixin(RequestMixin):
    """``GET`` and ``DELETE /v1/responses/{id}``."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "DELETE")

    async def handle_get(self, response_id: str) -> None:
        """A stored response; 404 when unknown."""
        await self.write_large_json(self.xllm.responses.retrieve(response_id, user=self.caller.user, query=self.query,
                                                                 include=include_values(self)))

    async def handle_delete(self, response_id: str) -> None:
        """Forget a stored response; 404 when unknown."""
        self.write_json(self.xllm.responses.delete(response_id, user=self.caller.user))


class ResponseInputItemsMixin(RequestMixin):
    """``GET /v1/responses/{id}/input_items``."""

    async def handle_get(self, response_id: str) -> None:
        """One page of the response's input items (``limit``, ``order``, ``after``)."""
        self.write_json(self.xllm.responses.input_items(response_id, self.query, user=self.caller.user,
                                                        include=include_values(self)))


class ResponseCancelMixin(RequestMixin):
    """``POST /v1/responses/{id}/cancel``."""

    SUPPORTED_METHODS: tuple[str, ...] = ("POST",)

    async def handle_post(self, response_id: str) -> None:
        """404 when unknown, else 400: only background responses can be cancelled, and there are none here."""
        self.xllm.responses.cancel(response_id, user=self.caller.user)
