"""The benchmark tools' own arithmetic: what they report must not mislead."""
from gptoss.tools.dev.bench import last_level_cache_bytes


def _cache(tmp_path, sizes):
    for i, size in enumerate(sizes):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    return tmp_path


def test_last_level_cache_is_the_largest_reported(tmp_path):
    assert last_level_cache_bytes(_cache(tmp_path, ["48K", "32K", "2048K", "491520K"])) == 480 * 2**20


def test_last_level_cache_units_and_gaps(tmp_path):
    assert last_level_cache_bytes(_cache(tmp_path, ["1M", "junk", "512"])) == 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 0


def test_the_attention_benchmark_runs_both_kernels_on_the_checkpoints_heads(tmp_path, capsys):
    import json

    from gptoss.tools.dev import bench_attention
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4}))
    assert bench_attention.main(["--model", str(tmp_path), "--rounds", "1", "--shapes", "3@5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 q heads / 2 kv heads of 8" in lines[0]
    assert len(lines) == 3 and "full" in lines[1] and "window 4" in lines[2]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-5 for line in lines[1:])  # the two kernels agree


def test_kv_bytes_reports_the_published_models_caches(capsys):
    """tools/dev/kv_bytes: gpt-oss-20b's cache at 8,192 positions, bf16, one row: 24 layers x 8 kv heads x 64 x 2
    bytes x (K and V) = 0.375 GiB on full-length caches; sliding layers on rings of 383 slots."""
    from gptoss.tools.dev.kv_bytes import main
    assert main(["--seq-lens", "8192"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gpt-oss-20b"))
    assert row.split()[1:] == ["8192", "0.375", "0.196", "0.523", "383"]
