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
