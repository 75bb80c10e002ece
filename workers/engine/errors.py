"""Typed errors the engine raises for bad input. Each is a `ValueError` so callers can map it to INVALID_ARGUMENT."""


class InvalidRequestError(ValueError):
    """A request the engine refuses; the engine keeps serving everything else."""


class EmptyPromptError(InvalidRequestError):
    """The prompt has no tokens."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context or the KV pool."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range."""


class UnknownAdapterError(InvalidRequestError):
    """The request names a LoRA adapter the engine has not loaded."""


class DuplicateRequestError(InvalidRequestError):
    """A request with this id is already in the engine."""


class UnknownRequestError(InvalidRequestError):
    """No request with this id is in the engine."""


class RequestFailedError(InvalidRequestError):
    """The engine failed this request alone while serving it (e.g. its sampling raised); the rest keep running."""


class EngineDeadError(RuntimeError):
    """The engine's step loop crashed or stopped making progress; none of its requests can finish.

    Not an `InvalidRequestError`: the request was fine, the worker was not. Callers treat the worker as lost.
    """
