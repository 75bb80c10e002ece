"""Fixtures of the fuzz tests: a real router and a real admin server (see fuzz_servers.py)."""

from fuzz_servers import admin_stack, router_stack  # noqa: F401

from tests.control_plane.conftest import redis_server_url  # noqa: F401  (the session's real redis-server)
