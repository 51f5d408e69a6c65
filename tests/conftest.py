import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Three architectures that differ in every dimension the model branches on.
CONFIGS = {
    "gqa-yarn": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False}),
    "mqa-default-rope": dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                             num_experts_per_tok=4, sliding_window=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "wide-yarn32": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=12, num_local_experts=16,
                        num_experts_per_tok=3, sliding_window=5, num_hidden_layers=3,
                        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0,
                                         "original_max_position_embeddings": 4096, "truncate": False}),
}


@pytest.fixture
def one_thread():
    """Tiny shapes: one thread is fastest, and far faster than two when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_hf_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random GPT-OSS checkpoint written by transformers' own save_pretrained (fp32), with every bias, sink
    and norm weight non-trivial so that a mis-wired one shows up in the logits."""
    import transformers

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                  max_position_embeddings=4096, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0, 0.5)
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.normal_(1, 0.2)
            elif "experts" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("small"), **CONFIGS["gqa-yarn"])


@pytest.fixture(params=(("amx", None), ("avx512", "own"), ("avx512", "mkl"), ("avx2", "own"), ("avx2", "mkl"),
                        ("scalar", None)),
                ids=("amx", "avx512-own-sgemm", "avx512-mkl-sgemm", "avx2-own-sgemm", "avx2-mkl-sgemm", "scalar"))
def isa(request):
    """Each CPU-kernel instruction-set path this CPU runs, forced for the test (model/kernels); the AVX-512 and AVX2
    paths with each of their many-rows products (their own sgemm and MKL's, whichever this CPU would pick)."""
    from gptoss.model import kernels
    name, sgemm = request.param
    if name not in kernels.available_isas():
        pytest.skip(f"this CPU does not run the {name} path (it runs {kernels.available_isas()})")
    before = kernels.isa()
    kernels.set_isa(name)
    assert kernels.isa() == name
    if sgemm:
        kernels.set_sgemm(sgemm)
        assert kernels.sgemm() == sgemm
    yield name
    kernels.set_isa(before)
    if sgemm:
        kernels.set_sgemm("auto")
