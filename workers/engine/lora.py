"""Multi-LoRA: PEFT adapters loaded on demand into a fixed number of slots, with LRU eviction."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from workers.engine.lora_layers import LoRALinear

logger = logging.getLogger(__name__)

_PREFIX = "base_model.model."


@dataclass
class LoRAAdapter:
    """One PEFT adapter in CPU memory: per target module, A `[r, in]` and B `[out, r]` with scaling folded into B."""

    name: str
    lora_id: int
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_peft_adapter(path: str | Path, targets: dict[str, LoRALinear], max_rank: int) -> tuple[int, dict]:
    """Parse a PEFT LoRA folder; returns (rank, {module path: (A, B * scaling)}). Raises `ValueError` on anything
    this engine cannot serve exactly."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a PEFT adapter: adapter_config.json is missing")
    if not weights_file.is_file():
        raise ValueError(f"{path}: adapter_model.safetensors is missing (pickled .bin adapters are not supported)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: LoRA bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={config['modules_to_save']} is not supported")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if rank > max_rank:
        raise ValueError(f"{path}: rank {rank} exceeds this engine's max_lora_rank={max_rank}")
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights_file))
    weights = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(_PREFIX).split(".lora_A.")[0]
        if module not in targets:
            raise ValueError(f"{path}: adapter targets {module!r}, which this model cannot adapt")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"{path}: {key} has no matching lora_B tensor")
        target = targets[module]
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            raise ValueError(
                f"{path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected "
                f"({rank}, {target.in_features}) and ({target.out_features}, {rank})"
            )
        weights[module] = (a, b * scaling)
    if not weights:
        raise ValueError(f"{path}: the adapter has no lora_A/lora_B tensors")
    return rank, weights


class LoRAManager:
    """Owns every target layer's stacked slot weights (fixed memory) and which adapter sits in which slot."""

    def __init__(self, targets: dict[str, LoRALinear], *, max_loras: int, max_lora_rank: int, dtype: torch.dtype):
        if max_loras <= 0 or max_lora_rank <= 0:
            raise ValueError("max_loras and max_lora_rank must be positive")
        self.targets = targets
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        for layer in targets.values():
            layer.lora_a = torch.zeros(max_loras, max_lora_rank, layer.in_features, dtype=dtype)
            layer.lora_b = torch.zeros(max_loras, layer.out_features, max_lora_rank, dtype=dtype)
        self._adapters: dict[str, LoRAAdapter] = {}
        self._by_id: dict[int, LoRAAdapter] = {}
        self._slots: OrderedDict[int, int] = OrderedDict()
        """lora_id -> slot, least recently used first."""
        self._next_id = 1
        self.num_loads = 0
        self.num_evictions = 0

    def add_adapter(self, name: str, path: str | Path) -> int:
        rank, weights = read_peft_adapter(path, self.targets, self.max_lora_rank)
        if name in self._adapters:
            self.remove_adapter(name)
        adapter = LoRAAdapter(name=name, lora_id=self._next_id, rank=rank, weights=weights)
        self._next_id += 1
        self._adapters[name] = adapter
        self._by_id[adapter.lora_id] = adapter
        logger.info("lora registered name=%s lora_id=%d rank=%d modules=%d", name, adapter.lora_id, rank, len(weights))
        return adapter.lora_id

    def remove_adapter(self, name: str) -> None:
        adapter = self._adapters.pop(name)
        del self._by_id[adapter.lora_id]
        self._slots.pop(adapter.lora_id, None)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def lora_id(self, name: str) -> int:
        return self._adapters[name].lora_id

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def resident_adapters(self) -> list[str]:
        """Adapters sitting in a slot (a request using one starts without a load), least recently used first."""
        return [self._by_id[lora_id].name for lora_id in self._slots]

    def activate(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Make every adapter of this batch resident; returns lora_id -> slot."""
        wanted = list(dict.fromkeys(lora_ids))
        if len(wanted) > self.max_loras:
            raise ValueError(f"a batch uses {len(wanted)} adapters but only {self.max_loras} slots exist")
        for lora_id in wanted:
            if lora_id in self._slots:
                self._slots.move_to_end(lora_id)
            else:
                self._load(lora_id, protected=set(wanted))
        return {lora_id: self._slots[lora_id] for lora_id in wanted}

    def _load(self, lora_id: int, protected: set[int]) -> None:
        used = set(self._slots.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(v for v in self._slots if v not in protected)
            slot = self._slots.pop(victim)
            self.num_evictions += 1
            logger.info("lora evicted lora_id=%d slot=%d", victim, slot)
        adapter = self._by_id[lora_id]
        for module, layer in self.targets.items():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
            if module in adapter.weights:
                a, b = adapter.weights[module]
                layer.lora_a[slot, : adapter.rank].copy_(a)
                layer.lora_b[slot, :, : adapter.rank].copy_(b)
        self._slots[lora_id] = slot
        self.num_loads += 1
        logger.info("lora loaded name=%s lora_id=%d slot=%d rank=%d", adapter.name, lora_id, slot, adapter.rank)


def token_slots(per_request_slots: list[int], query_lens: list[int]) -> torch.Tensor | None:
    """Expand each request's slot over its tokens; None when no token uses an adapter."""
    if all(s < 0 for s in per_request_slots):
        return None
    return torch.repeat_interleave(torch.tensor(per_request_slots), torch.tensor(query_lens))
