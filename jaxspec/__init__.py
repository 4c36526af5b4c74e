"""jaxspec: lossless speculative decoding for LLMs in JAX.

Public API only; see README.md. Everything here is importable without torch/transformers.
"""

from jaxspec.config import ModelConfig
from jaxspec.convert.checkpoint import load_params, save_params
from jaxspec.convert.hf import load_hf
from jaxspec.errors import CheckpointError, ConfigError, InputError, JaxspecError
from jaxspec.generate import DecodeState, ar_step, decode, generate, prefill, stream
from jaxspec.models import load_model
from jaxspec.sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodeState",
    "InputError",
    "JaxspecError",
    "ModelConfig",
    "SamplingParams",
    "ar_step",
    "decode",
    "generate",
    "load_hf",
    "load_model",
    "load_params",
    "prefill",
    "save_params",
    "stream",
]
