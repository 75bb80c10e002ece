"""gRPC router: authentication, admission, routing policies and the client SDK."""
