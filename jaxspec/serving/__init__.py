"""Serving: a continuous-batching engine with speculative decoding (`engine`), its metrics
(`metrics`), and an OpenAI-compatible HTTP server (`server`, needs the `serve` extra)."""

from jaxspec.serving.engine import Engine, EngineConfig, QueueFull, Request

__all__ = ["Engine", "EngineConfig", "QueueFull", "Request"]
