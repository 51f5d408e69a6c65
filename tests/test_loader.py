"""The loader refuses what it cannot load faithfully, naming the tensor or field."""
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss.model.config import ConfigError
from gptoss.model.loader import load_model
from gptoss.model.safetensors_reader import CheckpointError, SafetensorsReader
from gptoss.runtime.tokenizer import TextTokenizer, stop_token_ids
from gptoss.tools.make_checkpoint import make_checkpoint


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


# -- damaged files: CheckpointError naming the file and the fault (the fuzz test covers many more) ----------------
def _rewrite_header(path, edit):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A full checkpoint directory (tokenizer, chat template, generation_config) in two shards."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", {"num_hidden_layers": 2}, num_shards=2)


@pytest.fixture()
def tiny_copy(tiny_dir, tmp_path):
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def test_truncated_safetensors(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte \d+ of the "
                                              r"data area but the file holds \d+ bytes of data"):
        load_model(ckpt_copy)


def test_file_truncated_after_its_header_was_read(ckpt_copy):
    """A file that shrinks between the reader's check and a tensor's mapping is refused, not mapped past its end
    (reading there would kill the process with SIGBUS)."""
    reader = SafetensorsReader(ckpt_copy)
    name = max(reader.names(), key=lambda n: reader.entries[n].end)  # the tensor at the end of the file
    path = ckpt_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:reader.entries[name].end - 1])
    with pytest.raises(CheckpointError, match="was the file changed while loading"):
        reader.map(name, reader.shape(name))
    with pytest.raises(CheckpointError, match="was the file changed while loading"):
        with reader.open(name, reader.shape(name)):
            pass


def test_garbage_instead_of_safetensors(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(random.Random(0).randbytes(1 << 16))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file \(its first 8 bytes give "
                                              r"a header length of \d+ bytes\)"):
        load_model(ckpt_copy)


def test_header_not_json(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[9] = ord("?")  # inside the header's first key
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(safetensors header\): bad JSON at line 1, "
                                              r"column \d+"):
        load_model(ckpt_copy)


@pytest.mark.parametrize("edit, words", [
    (lambda h: h["model.norm.weight"].__setitem__("shape", [32]),
     r"tensor 'model.norm.weight': header inconsistent with the data: shape \[32\] of F32 is 128 bytes but "
     r"data_offsets \[\d+, \d+\] span 256"),
    (lambda h: h["model.norm.weight"].__setitem__("dtype", "F8_E4M3"), r"unsupported dtype F8_E4M3"),
    (lambda h: h["model.norm.weight"].__setitem__("dtype", 7), r"unknown dtype a number \(7\)"),
    (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [0, 2 ** 64]), r"header inconsistent"),
    (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [-256, 0]), r"data_offsets must be \[begin, end\]"),
    (lambda h: h["lm_head.weight"]["data_offsets"].__setitem__(1, h["lm_head.weight"]["data_offsets"][1] + 4) or
     h["lm_head.weight"]["data_offsets"].__setitem__(0, h["lm_head.weight"]["data_offsets"][0] + 4),
     r"overlap|belong to no tensor|ends at byte"),
    (lambda h: h.__setitem__("__metadata__", {"format": 5}), r"__metadata__ must map strings to strings"),
    (lambda h: h["model.norm.weight"].pop("shape"), r"tensor 'model.norm.weight': header entry lacks \['shape'\]"),
])
def test_header_inconsistent_with_data(ckpt_copy, edit, words):
    _rewrite_header(ckpt_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*" + words):
        load_model(ckpt_copy)


def test_header_length_shortened_onto_padding_is_refused(ckpt_copy):
    """The old reader loaded every tensor shifted by two bytes here: a header padded with spaces still parses when
    its length is cut, and the data area then starts two bytes early."""
    path = ckpt_copy / "model.safetensors"
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + size])).encode() + b"   "
    path.write_bytes(struct.pack("<Q", len(header) - 2) + header + data[8 + size:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header inconsistent with the data: the file has "
                                              r"2 bytes after the last tensor"):
        load_model(ckpt_copy)


def test_bad_config_json_names_line_and_column(ckpt_copy):
    path = ckpt_copy / "config.json"
    path.write_text('{\n  "model_type": "gpt_oss",\n  "hidden_size": 64,,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json: bad JSON at line 3, column 21: Expecting property "
                                              r"name"):
        load_model(ckpt_copy)


@pytest.mark.parametrize("field, value, words", [
    ("hidden_size", "64", r"'hidden_size' must be an integer in 1\.\.\d+, found a string \(\"64\"\)"),
    ("num_hidden_layers", -2, r"'num_hidden_layers' must be an integer in 1\.\.4096, found a number \(-2\)"),
    ("vocab_size", 2 ** 40, r"'vocab_size' must be an integer in 1\.\.\d+"),
    ("rms_norm_eps", [1], r"'rms_norm_eps' must be a number greater than 0, found a list"),
    ("rope_parameters", "yarn", r"'rope_parameters' must be an object, found a string"),
    ("eos_token_id", [1, "x"], r"'eos_token_id' must be a token id or a list of them"),
])
def test_config_field_of_the_wrong_kind(ckpt_copy, field, value, words):
    _edit_config(ckpt_copy, lambda c: c.__setitem__(field, value))
    with pytest.raises(ConfigError, match=r"config\.json: " + words):
        load_model(ckpt_copy)


def test_config_too_large_for_the_weights_is_refused_before_allocating(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c.__setitem__("vocab_size", 2 ** 30))  # 2^37 parameters: 512 GB in fp32
    with pytest.raises(CheckpointError, match=r"config\.json describes [\d,]+ parameters but \S*model\.safetensors "
                                              r"holds only [\d,]+ bytes"):
        load_model(ckpt_copy)


def test_missing_config_json(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_model(ckpt_copy)


def test_index_names_a_missing_shard(tiny_copy):
    (tiny_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: names shard "
                                              r"'model-00002-of-00002\.safetensors', which is not in"):
        load_model(tiny_copy)


def test_index_maps_a_tensor_its_shard_lacks(tiny_copy):
    index = tiny_copy / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"  # really in shard 2
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: holds tensor 'model\.norm\.weight' "
                                              r"but model\.safetensors\.index\.json maps it to "
                                              r"'model-00001-of-00002\.safetensors'"):
        load_model(tiny_copy)


def test_bad_generation_config(tiny_copy):
    (tiny_copy / "generation_config.json").write_text('{"eos_token_id": [1012, "1009"]}')
    with pytest.raises(CheckpointError, match=r"generation_config\.json: 'eos_token_id' must be a token id"):
        stop_token_ids(tiny_copy, ())
    (tiny_copy / "generation_config.json").write_text('{"eos_token_id": [1012\n')
    with pytest.raises(CheckpointError, match=r"generation_config\.json: bad JSON at line 2, column 1"):
        stop_token_ids(tiny_copy, ())


def test_bad_tokenizer_json(tiny_copy):
    path = tiny_copy / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: bad JSON at line \d+, column \d+"):
        TextTokenizer(tiny_copy)
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a tokenizer the `tokenizers` library can read"):
        TextTokenizer(tiny_copy)


def test_chat_template_syntax_error_names_file_and_line(tiny_copy):
    path = tiny_copy / "chat_template.jinja"
    path.write_text("{%- for message in messages -%}\n{{ message['content'] }}\n{%- endfo -%}\n")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja: the chat template fails at line 3"):
        TextTokenizer(tiny_copy).apply_chat_template([{"role": "user", "content": "hi"}])
    path.write_bytes(b"{{ messages }}\xff")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja: not UTF-8 text \(byte 14 is 0xff\)"):
        TextTokenizer(tiny_copy).apply_chat_template([{"role": "user", "content": "hi"}])


def test_cli_prints_one_line(tiny_copy, capsys):
    from gptoss.tools.cli import run_cli
    from gptoss.tools.generate import main

    path = tiny_copy / "model-00001-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(["--model", str(tiny_copy), "--backend", "eager", "--max-new-tokens", "1"]))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: truncated: tensor '"), lines
