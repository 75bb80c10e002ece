"""The routing table: the slice of the control plane's desired state a router needs, as plain data.

The control plane builds it from its store and hands it to every router replica; routers cache
it by `version`. API keys arrive only as hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from router.complexity import TierGroup
from router.quota import QuotaLimits


def hash_api_key(api_key: str) -> str:
    """The only form in which an API key is stored or compared: hex SHA-256 of its text."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(kw_only=True, frozen=True)
class DeploymentRoute:
    """What the router needs to know of one deployment."""

    name: str
    max_model_len: int | None = None
    """Longest prompt + output the deployment's workers accept, when known."""
    is_disaggregated: bool = False
    """Whether requests go through a prefill pool and then a decode pool."""


@dataclass(kw_only=True, frozen=True)
class RoutingTable:
    """Tenants, keys, deployments and adapter ownership at one state version."""

    version: int = 0
    """The state store's version this table was built from."""
    deployments: Mapping[str, DeploymentRoute] = field(default_factory=dict)
    tenants: Mapping[str, QuotaLimits] = field(default_factory=dict)
    """Tenant name -> its quota."""
    key_hashes: Mapping[str, str] = field(default_factory=dict)
    """`hash_api_key(key)` -> tenant name."""
    adapter_owners: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(deployment, adapter name) -> the tenant that owns it."""
    groups: Mapping[str, TierGroup] = field(default_factory=dict)
    """Tier group name -> its small and large deployments (groups with both tiers only)."""

    def tenant_for_key(self, api_key: str) -> str | None:
        return self.key_hashes.get(hash_api_key(api_key))
