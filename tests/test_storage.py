"""Workdirs in a bucket: URLs are kept as they are, and files written locally end up under the URL. The bucket
is simulated by mapping gs://bucket/... to a local directory (no network here)."""

import os

from etils import epath

from qwen3vl_jax import storage


def test_absolute_keeps_urls():
    assert storage.absolute("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
    assert storage.absolute("run") == os.path.join(os.getcwd(), "run")


def test_local_dir_copies_the_tree_to_the_bucket_on_exit(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    monkeypatch.setattr(storage, "path", lambda url: epath.Path(bucket / url.removeprefix("gs://")))
    with storage.local_dir("gs://run/hf") as local:
        assert not local.startswith(str(bucket))
        os.makedirs(os.path.join(local, "sub"))
        for name, text in (("config.json", "{}"), ("sub/tokenizer.json", "[]")):
            with open(os.path.join(local, name), "w") as f:
                f.write(text)
        assert not (bucket / "run").exists()  # nothing is copied before the writes are complete
    assert (bucket / "run/hf/config.json").read_text() == "{}"
    assert (bucket / "run/hf/sub/tokenizer.json").read_text() == "[]"
    with storage.local_dir(str(tmp_path / "plain")) as local:  # a local path is used as it is
        assert local == str(tmp_path / "plain") and os.path.isdir(local)
