"""The loader refuses what it cannot load faithfully, naming the tensor or field."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss.model.config import ConfigError
from gptoss.model.loader import load_model
from gptoss.model.safetensors_reader import CheckpointError


@pytest.fixture()
def ckpt_copy(small_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint, out)
    return out


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(ckpt_copy):
    _edit_tensors(ckpt_copy, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.sinks' is missing"):
        load_model(ckpt_copy)


def test_wrong_shape(ckpt_copy):
    name = "model.layers.0.mlp.experts.down_proj"

    def edit(t):
        t[name] = t[name][:, :-1].contiguous()
    _edit_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.down_proj' in \S*model\.safetensors has "
                                              r"shape \[8, 63, 64\], expected \[8, 64, 64\] from config.json"):
        load_model(ckpt_copy)


def test_unknown_quantisation_tensors(ckpt_copy):
    def edit(t):
        t["model.layers.0.mlp.experts.down_proj_qweight"] = torch.zeros(4, dtype=torch.int32)
    _edit_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match="down_proj_qweight"):
        load_model(ckpt_copy)


def test_mxfp4_blocks_without_quantization_config(ckpt_copy):
    def edit(t):
        t["model.layers.0.mlp.experts.down_proj_blocks"] = torch.zeros(8, 64, 2, 16, dtype=torch.uint8)
    _edit_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match="quantization_config"):
        load_model(ckpt_copy)


@pytest.mark.parametrize("field, value, words", [
    ("model_type", "llama", "model_type 'llama'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("quantization_config", {"quant_method": "gptq"}, "quantization 'gptq'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope type 'longrope'"),
    ("layer_types", ["full_attention", "chunked_attention", "full_attention", "full_attention"],
     "layer type 'chunked_attention'"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads=3"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("num_experts_per_tok", 9, "num_experts_per_tok=9"),
])
def test_unsupported_config_value(ckpt_copy, field, value, words):
    _edit_config(ckpt_copy, lambda c: c.__setitem__(field, value))
    with pytest.raises(ConfigError, match=words):
        load_model(ckpt_copy)


def test_missing_required_config_field(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c.pop("num_local_experts"))
    with pytest.raises(ConfigError, match="'num_local_experts' is missing"):
        load_model(ckpt_copy)


def test_sharded_checkpoint_loads_the_same(small_checkpoint, tmp_path):
    tensors = load_file(small_checkpoint / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    shutil.copytree(small_checkpoint, out)
    (out / "model.safetensors").unlink()
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname)
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(small_checkpoint), load_model(out)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
