"""Which iteration directories count as whole checkpoints (what `latest` may name, and resume falls back to)."""

from pause_megatron.checkpoint import COMPLETE, LEGACY_COMMON_STATE, is_complete


def _files(path, *names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x")
    return path


def test_a_checkpoint_is_complete_only_once_every_part_is_written(tmp_path):
    # save() writes shards and metadata.json, then each rank's RNG state, then COMPLETE.
    assert is_complete(_files(tmp_path / "new", "metadata.json", LEGACY_COMMON_STATE, "rng/rank0.pt", COMPLETE))
    # a crash after dist_checkpointing finished but before the RNG states: resuming from it would not be exact
    assert not is_complete(_files(tmp_path / "no_rng", "metadata.json", LEGACY_COMMON_STATE))
    empty_rng = _files(tmp_path / "empty_rng", "metadata.json", LEGACY_COMMON_STATE)
    (empty_rng / "rng").mkdir()
    assert not is_complete(empty_rng)
    # checkpoints written before COMPLETE existed: metadata, common state and RNG states stand for it
    assert is_complete(_files(tmp_path / "old", "metadata.json", LEGACY_COMMON_STATE, "rng/rank0.pt"))
    assert not is_complete(_files(tmp_path / "partial", LEGACY_COMMON_STATE))
