"""Nothing per-sample leaves the machine through `push_to_hub`: no recorder state, no store file.

The Hub is faked offline: `HfApi.create_repo` and `HfApi.upload_folder` (what Trainer calls) are
replaced by functions that list the files an upload would send, filtered by huggingface_hub's own
`filter_repo_objects` with the patterns Trainer passes (and the ones huggingface_hub always adds).
"""

from concurrent.futures import Future
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
from tiny import text_dataset, tiny_bert, tiny_config

from hf_amnesia import AmnesiacTrainer, ConfigError

STORE_FILES = ("manifest.json", "shard-", "audit.jsonl", "store.key", "lineage.jsonl", ".lock")


class FakeHub:
    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/someone/{repo_id}")

    def upload_folder(
        self, api, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kwargs
    ):
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        ignored = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        sent = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignored)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        self.uploads.append([prefix + name for name in sent])
        done = Future()
        done.set_result(None)
        return done if kwargs.get("run_as_future") else None

    def sent(self) -> list[str]:
        return [name for upload in self.uploads for name in upload]


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def _args(out, **overrides):
    return tiny_config(
        out, keep_fraction=0.2, save_strategy="steps", save_steps=2, hub_model_id="amnesia-test", **overrides
    )


def _per_sample(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "amnesia_recorder-" in base or "_amnesia_store" in name or base.startswith(STORE_FILES)


def test_every_save_and_push_to_hub_upload_no_per_sample_file(tmp_path, hub):
    args = _args(tmp_path / "out", push_to_hub=True, hub_strategy="every_save")
    trainer = AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(16))
    trainer.train()
    trainer.push_to_hub()
    assert list((tmp_path / "out").glob("checkpoint-*/amnesia_recorder-*.safetensors"))  # there to leave out
    assert (tmp_path / "out" / "_amnesia_store" / "manifest.json").exists()
    assert len(hub.uploads) >= 3 and "model.safetensors" in hub.sent()
    assert [name for name in hub.sent() if _per_sample(name)] == []


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_checkpoint_pushes_are_refused_before_any_hub_call(tmp_path, hub, strategy):
    args = _args(tmp_path / "out", push_to_hub=True, hub_strategy=strategy)
    with pytest.raises(ConfigError, match=f"hub_strategy='{strategy}'.*amnesia_recorder"):
        AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(16))
    assert hub.repos == [] and hub.uploads == []


def test_checkpoint_pushes_without_recording_upload_no_per_sample_file(tmp_path, hub):
    args = _args(tmp_path / "out", push_to_hub=True, hub_strategy="all_checkpoints")
    trainer = AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(8), record=False)
    trainer.train()
    assert any(name.startswith("checkpoint-") for name in hub.sent())
    assert [name for name in hub.sent() if _per_sample(name)] == []


def test_a_store_that_push_to_hub_would_upload_is_refused(tmp_path, hub):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="store_dir=.* lies inside output_dir"):
        AmnesiacTrainer(model=tiny_bert(), args=_args(out, push_to_hub=True, store_dir=str(out / "store")))
    trainer = AmnesiacTrainer(model=tiny_bert(), args=_args(out, store_dir=str(out / "store")))
    with pytest.raises(ConfigError, match="leave `_\\*` out"):
        trainer.push_to_hub()
    assert hub.repos == [] and hub.uploads == []
    outside = AmnesiacTrainer(model=tiny_bert(), args=_args(out, store_dir=str(tmp_path / "store")))
    outside.push_to_hub()
    assert hub.uploads and [name for name in hub.sent() if _per_sample(name)] == []
