"""The context-length error in each endpoint's own terms: chat's messages, the legacy prompt, Responses' input."""

from __future__ import annotations

from ..core.errors import ContextLengthExceeded

#: what follows "you requested N tokens " for each prompt param: chat's as the engine words it (as api.openai.com
#: does); the legacy endpoint has no messages, Responses no messages or completion to reduce
_SPLIT = {
    "messages": "({prompt} in the messages, {completion} in the completion). Please reduce the length of the messages "
                "or completion.",
    "prompt": "({prompt} in the prompt, {completion} in the completion). Please reduce the length of the prompt or "
              "max_tokens.",
    "input": "({prompt} in the input, {completion} in the output). Please reduce the length of the input or "
             "max_output_tokens.",
}


class PromptTooLong(ContextLengthExceeded):
    """The prompt plus the tokens asked for pass the model's context (400), worded for the param it names."""

    def __init__(self, context: int, prompt: int, completion: int, param: str):
        self.counts = (context, prompt, completion)
        super().__init__(self._words(param), param=param)

    def _words(self, param: str) -> str:
        context, prompt, completion = self.counts
        split = _SPLIT.get(param, _SPLIT["messages"]).format(prompt=prompt, completion=completion)
        return (f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt + completion} tokens {split}")

    def reword(self, param: str) -> None:
        """Name ``param`` (another endpoint's prompt) instead, in that endpoint's words."""
        self.param, self.message = param, self._words(param)
        self.args = (self.message,)
