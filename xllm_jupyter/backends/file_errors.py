"""What reading a model's or adapter's files raises when they are damaged or say odd things: a load error, not our bug."""

from __future__ import annotations


def file_errors() -> tuple[type[BaseException], ...]:
    """The exception types a load from damaged files raises, for the backends' ``except`` clauses.

    Besides the builtins (torch's OutOfMemoryError is a RuntimeError): transformers' strict configs raise a bare
    ``Exception`` subclass for config.json fields of the wrong type, and safetensors raises its own
    ``SafetensorError`` (an ``Exception``) for a weights file cut short or with a damaged header; uncaught, both
    were a 500 "server error" instead of the load error that names the model.
    """
    found: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError]
    try:
        from huggingface_hub.errors import StrictDataclassError
        found.append(StrictDataclassError)
    except ImportError:
        pass
    try:
        from safetensors import SafetensorError
        found.append(SafetensorError)
    except ImportError:
        pass
    return tuple(found)
