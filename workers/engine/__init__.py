"""raylane's paged-KV, continuous-batching inference engine."""
