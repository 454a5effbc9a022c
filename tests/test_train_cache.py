"""The shard cache reaches the trainer: --cache_dir/--cache_max_bytes become the loader's I/O
options (and win over the data config's cache:)."""

import pytest

from lumina.train_config import ConfigError, parse_args


def test_cache_flags_become_io_options(tmp_path):
    cfg = parse_args(
        [
            "--data_config",
            "mix.yaml",
            "--init_from",
            "m",
            "--cache_dir",
            str(tmp_path / "c"),
            "--cache_max_bytes",
            "2G",
        ]
    )
    opts = cfg.data.io_options()
    assert opts.cache_dir == str(tmp_path / "c") and opts.cache_max_bytes == 2 << 30
    plain = parse_args(["--data_config", "mix.yaml", "--init_from", "m"]).data.io_options()
    assert plain.cache_dir is None


def test_cache_size_without_a_folder_is_an_error():
    with pytest.raises((ConfigError, SystemExit)):
        parse_args(["--data_config", "mix.yaml", "--init_from", "m", "--cache_max_bytes", "2G"])
