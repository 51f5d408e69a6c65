"""tools.dev.llama_peer: llama.cpp on the same checkpoint (its own virtualenv; those tests are slow and skipped
when the virtualenv has not been built: `python -m gptoss.tools.dev.llama_peer --model DIR` builds it)."""

import json

import pytest
import torch
from safetensors import safe_open

from gptoss.tools.dev import llama_peer
from gptoss.tools.make_checkpoint import make_checkpoint


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_fp32_copy_equals_the_fp32_layout(tmp_path):
    """The F32 GGUF's source: experts decoded from MXFP4 are exactly the fp32 layout of the same seed."""
    mx = make_checkpoint(tmp_path / "mx", "tiny", layout="mxfp4", seed=0)
    ref = _tensors(make_checkpoint(tmp_path / "fp32", "tiny", layout="fp32", seed=0))
    (tmp_path / "copy").mkdir()
    llama_peer._write_fp32_copy(mx, tmp_path / "copy")
    got = _tensors(tmp_path / "copy")
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert "quantization_config" not in config
    index = json.loads((tmp_path / "copy" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == ref.keys()
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == (mx / "tokenizer.json").read_bytes()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(llama_peer.PeerError, match="no config.json"):
        llama_peer.gguf_path(tmp_path)
    with pytest.raises(llama_peer.PeerError, match="unknown GGUF kind"):
        llama_peer.gguf_path(tmp_path, kind="q4_0")


def test_cpu_isa_is_named():
    assert llama_peer.cpu_isa()


def test_builds_have_their_own_venv_and_flags():
    """Each llama.cpp build lives in its own venv with its CMake flags; the ISA a build used is read from its
    system info, not from the machine (an AVX2 build on an AVX-512 machine says AVX2)."""
    assert llama_peer.venv_for("native") == llama_peer.DEFAULT_VENV != llama_peer.venv_for("avx2")
    flags = llama_peer._build_flags(llama_peer.venv_for("avx2")).split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags and "-DGGML_AVX512=OFF" in flags
    assert llama_peer._build_flags(llama_peer.DEFAULT_VENV) == "-DGGML_NATIVE=ON"
    with pytest.raises(llama_peer.PeerError, match="unknown llama.cpp build 'avx9'"):
        llama_peer.venv_for("avx9")
    avx2 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | REPACK = 1 |"
    assert llama_peer.built_isa(avx2) == "AVX2"
    assert llama_peer.built_isa("CPU : AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 |") == "AVX-512 with bf16"
    assert llama_peer.built_isa("CPU : AVX512 = 1 | AVX512_VNNI = 1 |") == "AVX-512"
    assert llama_peer.built_isa("") == "unknown"


_VENV_READY = llama_peer.DEFAULT_VENV.joinpath(f".llama-cpp-python-{llama_peer.LLAMA_CPP_PYTHON}").exists()
needs_llama = pytest.mark.skipif(not _VENV_READY, reason="llama.cpp virtualenv not built (build/llama-venv)")


@pytest.mark.slow
@needs_llama
def test_measure_on_tiny(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    res = llama_peer.measure(ckpt, threads=1, decode_tokens=8, rounds=1, cache_dir=tmp_path)
    assert res["kind"] == "mxfp4" and res["threads"] == 1
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
        assert res[key] > 0, key


@pytest.mark.slow
@needs_llama
def test_logits_match_llama_cpp_f32_with_truncated_yarn(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny", {"preset": "tiny", "rope_parameters": {"truncate": True}}, seed=0)
    # 200 positions: past the window (8) and the YaRN original context (128). Measured: 6.9e-6 (logits up to 4.7);
    # with the published truncate=false the same comparison differs by 4.4 (llama.cpp rounds the range anyway).
    res = llama_peer.compare_logits(ckpt, threads=1, length=200, cache_dir=tmp_path)
    assert res["yarn_truncate"] is True
    assert res["max_abs_diff"] < 1e-4 and res["argmax_agree"] == 1.0, res
