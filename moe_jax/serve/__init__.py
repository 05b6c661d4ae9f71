"""Serving: the sharded prefill and decode step with its KV cache, sampling and generation."""
