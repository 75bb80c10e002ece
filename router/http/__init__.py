"""The OpenAI-compatible HTTP front: a Starlette app over the same `RouterCore` the gRPC servicer drives."""
