"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory, without torch.

`gguf_to_hf(path, out_dir)` reads the file with `gguf.GGUFReader`, dequantizes every tensor with
`gguf.quants.dequantize` and writes what `transformers.LlamaForCausalLM` and `tokenizers` read:

    model.safetensors        float32 (default) or bfloat16 tensors under HF names
    config.json              a `LlamaConfig`
    generation_config.json   bos / eos / pad token ids
    tokenizer.json           byte-level BPE rebuilt from the GGUF vocabulary and merges
    tokenizer_config.json    special token strings, `add_bos_token`, the chat template
    special_tokens_map.json  special token strings

Conventions:

* Tensors are numpy arrays in HF layout: a linear weight is `[out_features, in_features]`. GGUF
  lists a tensor's dimensions fastest-first (`[in, out]`), the reverse of numpy's order; every
  array is checked against the shape HF expects before it is written.
* llama.cpp stores `attn_q` / `attn_k` with rows permuted for its RoPE kernel; that permutation is
  undone here (`unpermute_qk`), so the output matches the original HF checkpoint.
* No `output.weight` tensor means the LM head is tied to the embedding (`tie_word_embeddings`);
  then no `lm_head.weight` is written.
* Only `general.architecture == "llama"` with a `gpt2` (byte-level BPE) tokenizer is supported.
* The output directory appears whole or not at all: everything is written into a temporary sibling
  `.tmp-<name>-*` that is renamed into place at the end and removed on any failure.
* Every problem with the input file is raised as `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from jaxspec.errors import CheckpointError, ConfigError
from jaxspec.fsutil import apply_umask, move_into_place

__all__ = ["gguf_to_hf", "unpermute_qk"]

SUPPORTED_ARCHITECTURES = ("llama",)
_DTYPES = ("float32", "bfloat16")

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class LlamaHParams:
    """The hyperparameters of a llama GGUF, under HF names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool


def gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert the GGUF file `gguf_path` into a HF checkpoint directory `out_dir`; return its path.

    `dtype` is the dtype of the written tensors ("float32" or "bfloat16"). An existing `out_dir`
    is an error unless `overwrite` is true, in which case it is replaced (only once the new one is
    complete). Raises `CheckpointError` for a missing, corrupt or unsupported file.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass overwrite=True to replace it")
    reader = _open_reader(gguf_path)
    meta = _read_metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf_path}: unsupported architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})"
        )
    hparams = _llama_hparams(meta, reader, gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_json(tmp / "config.json", _config_json(hparams, meta, dtype))
        _write_json(tmp / "generation_config.json", _generation_config_json(meta))
        _write_tokenizer_files(tmp, meta, hparams, gguf_path)
        tensors = _convert_tensors(reader, hparams, gguf_path, dtype, progress)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        apply_umask(tmp)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading the file


def _open_reader(path: Path) -> Any:
    """A `GGUFReader` on `path`; any failure to parse the header becomes a `CheckpointError`."""
    from gguf import GGUFReader

    if not path.exists():
        raise CheckpointError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # bad magic, truncated header, unknown value types, empty file, ...
        raise CheckpointError(
            f"{path}: not a GGUF file, or corrupt or truncated ({type(e).__name__}: {e})"
        ) from e


def _read_metadata(reader: Any, path: Path) -> dict[str, Any]:
    """Every key/value field of the file as plain Python values (strings, numbers, lists)."""
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from e


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
    return meta[key]


def _f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(value)))


def _llama_hparams(meta: dict[str, Any], reader: Any, path: Path) -> LlamaHParams:
    """Read the llama hyperparameters from the metadata and check them for consistency."""
    p = "llama."
    hidden = int(_require(meta, p + "embedding_length", path))
    n_head = int(_require(meta, p + "attention.head_count", path))
    n_kv = int(meta.get(p + "attention.head_count_kv", n_head))
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim or n_head % n_kv or head_dim % 2:
        raise CheckpointError(
            f"{path}: unsupported attention shape (heads={n_head}, kv_heads={n_kv}, "
            f"head_dim={head_dim}, rope.dimension_count={rope_dim})"
        )
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(p + "vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no llama.vocab_size)")
    return LlamaHParams(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_require(meta, p + "feed_forward_length", path)),
        num_hidden_layers=int(_require(meta, p + "block_count", path)),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32(_require(meta, p + "attention.layer_norm_rms_epsilon", path)),
        rope_theta=_f32(meta.get(p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_require(meta, p + "context_length", path)),
        rope_scaling=_rope_scaling(meta, names, path),
        tie_word_embeddings="output.weight" not in names,
    )


def _rope_scaling(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict | None:
    """HF `rope_scaling` for the GGUF's `llama.rope.scaling.*` keys; None when there is none."""
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported")
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn" and factor is not None:
        original = meta.get("llama.rope.scaling.original_context_length")
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise CheckpointError(f"{path}: unsupported RoPE scaling type {kind!r}")


# ----------------------------------------------------------------------------------------------
# Tensors


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q_proj / k_proj weight (`n_head` = heads in `w`).

    HF Llama applies RoPE to the two *halves* of each head (`rotate_half`), while llama.cpp's
    kernel rotates *adjacent pairs* (x[2i], x[2i+1]). So `convert_hf_to_gguf.py` reorders the rows
    of each head, interleaving its two halves:

        w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)

    The inverse reads the rows as (head, pair, half) and swaps the last two back. Use the query
    head count for q and the key/value head count for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape} over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if it is not a llama tensor."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_TENSORS:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.weight"


def _expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the checkpoint must have."""
    d, q, kv = hp.hidden_size, hp.num_attention_heads * hp.head_dim, hp.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (hp.vocab_size, d), "model.norm.weight": (d,)}
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.vocab_size, d)
    for i in range(hp.num_hidden_layers):
        pre = f"model.layers.{i}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (q, d),
            pre + "self_attn.k_proj.weight": (kv * hp.head_dim, d),
            pre + "self_attn.v_proj.weight": (kv * hp.head_dim, d),
            pre + "self_attn.o_proj.weight": (d, q),
            pre + "mlp.gate_proj.weight": (hp.intermediate_size, d),
            pre + "mlp.up_proj.weight": (hp.intermediate_size, d),
            pre + "mlp.down_proj.weight": (d, hp.intermediate_size),
            pre + "input_layernorm.weight": (d,),
            pre + "post_attention_layernorm.weight": (d,),
        }
    return shapes


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """The float32 values of one GGUF tensor, in numpy order (GGUF's dims reversed)."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt tensor {tensor.name} ({e})") from e
    if values.size != int(np.prod(shape)):
        raise CheckpointError(
            f"{path}: tensor {tensor.name} holds {values.size} values, its shape {shape} says "
            f"{int(np.prod(shape))} (truncated file?)"
        )
    return values.reshape(shape).astype(np.float32, copy=False)


def _convert_tensors(
    reader: Any, hp: LlamaHParams, path: Path, dtype: str, progress: bool
) -> dict[str, np.ndarray]:
    """Dequantize, rename, unpermute and cast every tensor; check names and shapes against HF."""
    np_dtype = _numpy_dtype(dtype)
    expected = _expected_shapes(hp)
    out: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc=f"Converting {path.name}", disable=not progress):
        name = _hf_name(tensor.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name} for a llama model")
        w = _dequantize(tensor, path)
        if w.shape != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} has shape {w.shape}, expected {expected[name]}"
            )
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, hp.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, hp.num_key_value_heads)
        out[name] = np.ascontiguousarray(w.astype(np_dtype))
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]} ({len(missing)} in all)")
    return out


def _numpy_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


# ----------------------------------------------------------------------------------------------
# Config files


def _token_id(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if value is None else int(value)


def _config_json(hp: LlamaHParams, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A `LlamaConfig` as a dict."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.max_position_embeddings,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": hp.rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "bos_token_id": _token_id(meta, "bos"),
        "eos_token_id": _token_id(meta, "eos"),
        "pad_token_id": _token_id(meta, "padding"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def _generation_config_json(meta: dict[str, Any]) -> dict[str, Any]:
    ids = {"bos": "bos", "eos": "eos", "pad": "padding"}
    return {f"{k}_token_id": _token_id(meta, v) for k, v in ids.items()}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer(pre: str, path: Path) -> Any:
    """The `tokenizers` pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` value."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":
        # As SmolLM2's own tokenizer.json (and llama.cpp's "smollm" regexes `\p{N}` then GPT-2's):
        # every digit on its own, then GPT-2's split. Not the same as GPT-2's split alone: "a  1"
        # is [a, ĠĠ, 1] here but [a, Ġ, Ġ, 1] with GPT-2's regex (" 1" is one GPT-2 piece).
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    raise CheckpointError(f"{path}: unsupported tokenizer pre-tokenizer {pre!r}")


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: unsupported tokenizer model {kind!r} (only 'gpt2')")
    tokens: list[str] = _require(meta, "tokenizer.ggml.tokens", path)
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise CheckpointError(f"{path}: duplicate tokens or token types of the wrong length")
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = _token_id(meta, key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{path}: {key} token id {token_id} is outside the vocabulary")
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges", path)]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{path}: a merge in tokenizer.ggml.merges is not two tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"), path)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, tokens, processors)
    # Control tokens (<|im_start|>, ...) are special: matched whole, dropped by skip_special_tokens.
    # User-defined ones are matched whole too, but are ordinary text (as transformers does).
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _TOKEN_CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in typed
            if k == _TOKEN_USER_DEFINED
        ]
    )
    if tok.get_vocab_size() != len(tokens):
        raise CheckpointError(
            f"{path}: tokenizer has {tok.get_vocab_size()} ids, not {len(tokens)}"
        )
    return tok


def _post_processor(meta: dict[str, Any], tokens: list[str], processors: Any) -> Any:
    """ByteLevel offsets, plus BOS / EOS around each sequence when the metadata asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos, eos = _token_id(meta, "bos"), _token_id(meta, "eos")
    pre = [bos] if meta.get("tokenizer.ggml.add_bos_token") and bos is not None else []
    post = [eos] if meta.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if not pre and not post:
        return byte_level

    def seq(piece: str, type_id: int) -> list[str]:
        return [
            f"{p}:{type_id}" for p in [*(tokens[i] for i in pre), piece, *(tokens[i] for i in post)]
        ]

    template = processors.TemplateProcessing(
        single=seq("$A", 0),
        pair=seq("$A", 0) + seq("$B", 1),
        special_tokens=[(tokens[i], i) for i in dict.fromkeys(pre + post)],
    )
    return processors.Sequence([byte_level, template])


def _write_tokenizer_files(out: Path, meta: dict[str, Any], hp: LlamaHParams, path: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tok = _build_tokenizer(meta, path)
    tok.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _token_id(meta, key)
        if token_id is not None:
            special[f"{name}_token"] = tokens[token_id]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.max_position_embeddings,
        **special,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)
