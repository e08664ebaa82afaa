"""Training on a shard set given only through the user's own YAML (`--config-dir DIR
data=NAME`), with planted bad data counted in metrics.jsonl, and on_error=raise failing with
the shard and the key through the real entry point."""

from __future__ import annotations

import math

from tests.data_shards import (
    image_bytes,
    interleaved,
    pairs,
    texts,
    user_config_dir,
    with_config_dir,
    write_raw_tar,
    write_shards,
)
from tests.helpers import metrics, train


def test_training_from_a_user_data_config(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards / "pairs", pairs(16), 4)
    write_shards(shards / "il", interleaved(8), 2)
    write_raw_tar(
        shards / "text" / "broken-000000.tar",
        [("a.txt", b"a fine text"), ("b.txt", b"\xff\xfe not utf-8"), ("c.txt", b"")],
    )
    write_shards(shards / "text", texts(12), 3, prefix="good")
    config_dir = user_config_dir(
        tmp_path / "conf",
        "mine",
        f"""seq_len: 48
num_streams: 4
num_workers: 1
sources:
  - {{urls: "{shards}/pairs/shard-{{000000..000003}}.tar", format: pairs, weight: 2}}
  - {{urls: "{shards}/il", format: interleaved, weight: 1}}
  - urls: ["{shards}/text/broken-000000.tar", "{shards}/text/good-*.tar"]
    format: text
""",
    )
    run_dir = tmp_path / "run"
    train(run_dir, "data=mine", "trainer.max_steps=6", launcher=with_config_dir(config_dir))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["tokens_image"] > 0 for r in rows)
    last = rows[-1]
    assert last["data/documents"] > 20
    assert last["data/skipped_bad_utf8"] >= 1 and last["data/skipped_empty_text"] >= 1
    assert last["data/skipped_corrupt_image"] == 0


def test_on_error_raise_stops_training_naming_shard_and_key(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    write_raw_tar(
        bad,
        [("ok.png", image_bytes(0)), ("ok.txt", b"fine"), ("zz.jpg", b"junk"), ("zz.txt", b"x")],
    )
    config_dir = user_config_dir(
        tmp_path / "conf",
        "bad",
        f'seq_len: 48\nnum_streams: 1\nsources:\n  - {{urls: "{bad}", format: pairs}}\n',
    )
    proc = train(
        tmp_path / "run",
        "data=bad",
        "data.on_error=raise",
        "trainer.max_steps=3",
        check=False,
        launcher=with_config_dir(config_dir),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"corrupt_image in shard {bad}, key 'zz'" in proc.stderr
