"""Store format 2: every byte the forget path reads is checksummed, damage is a `StoreError` before
anything changes, a version-1 store is migrated, the key and the lineage file, no symbolic links."""

import copy
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config

from hf_amnesia import AmnesiacTrainer, StoreError, StoreReader
from hf_amnesia.cli import main
from hf_amnesia.forgetting import model_record
from hf_amnesia.layout import ParamLayout
from hf_amnesia.store import FORMAT_VERSION, Manifest, lineage
from hf_amnesia.store.audit import append_audit, read_audit
from hf_amnesia.store.checksums import with_checksum
from hf_amnesia.store.journal import commit, load_journal, prepare, recover, roll_forward, store_lock
from hf_amnesia.store.keys import create_key, id_digests, ids_digest, key_check, load_key
from hf_amnesia.store.migrate import migrate

FIRST = 100  # forgotten by the fixture's committed request
NEXT = 107  # what each case then tries to forget


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained CNN, its store (one request committed, one lineage entry) and the saved model."""
    base = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    trainer = AmnesiacTrainer(
        model=TinyCNN(),
        args=tiny_config(base / "run", keep_fraction=0.2),
        train_dataset=image_dataset(24, classes=3, seed=0, with_ids=True),
    )
    trainer.train()
    trainer.forget([FIRST], scale=1.0, repair_steps=0, save_to=base / "model")
    store = base / "run" / "_amnesia_store"
    manifest = Manifest.load(store)
    with store_lock(store):
        lineage.register(store, manifest.final_weights, id_digests(load_key(store), [FIRST]))
    return trainer.model, store, base / "model"


@pytest.fixture
def copy_of(served, tmp_path):
    """A fresh copy of the served store and model, and a trainer on them."""
    model, store, model_dir = served
    shutil.copytree(store, tmp_path / "store")
    shutil.copytree(model_dir, tmp_path / "model")
    args = tiny_config(tmp_path / "out", keep_fraction=0.2, store_dir=str(tmp_path / "store"))
    trainer = AmnesiacTrainer(model=copy.deepcopy(model), args=args)
    return trainer, tmp_path / "store", tmp_path / "model"


def _hashes(*folders):
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _flip_last_byte(path, back=1):
    data = bytearray(path.read_bytes())
    data[-back] ^= 0x40
    path.write_bytes(bytes(data))


def _ids_file(store):
    return next(store.glob("shard-00000.g*.ids.npy"))


def _flip_an_id(store):
    """Change one stored id (a bit of its value): the id a row belongs to."""
    _flip_last_byte(_ids_file(store), back=8 * 3)  # the lowest byte of the 3rd id from the end


def _object_ids(store):
    """An ids file holding pickled objects, its sha256 recorded as if it had been written so."""
    path = _ids_file(store)
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    _edit_json(store / "shard-00000.json", lambda d: d.update(ids_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    _rechecksum(store / "shard-00000.json")


def _rechecksum(path):
    path.write_text(json.dumps(with_checksum(json.loads(path.read_text()))))


def _pending_journal(store, model_dir):
    """A committed request's journal (as a crash leaves it), then one of its fields edited."""
    audit = dict(read_audit(store)[0], request="feedfeed")
    commit(store, prepare(model_dir, np.array([NEXT]), audit))
    _edit_json(store / "forget-journal.json", lambda d: d.update(purged_ids=[NEXT, 114]))


def _edit_audit_line(store):
    path = store / "audit.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"forgotten": 1', b'"forgotten": 2'))


def _edit_lineage_line(store):
    path = store / "lineage.jsonl"
    lines = path.read_text().splitlines()
    number = next(i for i, text in enumerate(lines) if json.loads(text)["forgotten"])
    line = json.loads(lines[number])
    line["forgotten"] = []
    line["count"] = 0
    lines[number] = json.dumps(line)
    path.write_text("\n".join(lines) + "\n")


# case: (damage, what the error says, caught when StoreReader opens the store)
DAMAGE = {
    "id_bit_flip": (lambda s, m: _flip_an_id(s), "ids of store shard 0", True),
    "ids_pickled": (lambda s, m: _object_ids(s), "not a plain .npy", True),
    "sums_bit_flip": (lambda s, m: _flip_last_byte(next(s.glob("shard-00000.g*.sums.npy"))), "row checksums", True),
    "manifest_seed": (lambda s, m: _edit_json(s / "manifest.json", lambda d: d.update(seed=7)), "manifest", True),
    "manifest_decay": (
        lambda s, m: _edit_json(s / "manifest.json", lambda d: d.update(decay=[q * 2 for q in d["decay"]])),
        "manifest",
        True,
    ),
    "manifest_keep_fraction": (
        lambda s, m: _edit_json(s / "manifest.json", lambda d: d.update(keep_fraction=0.25)),
        "manifest",
        True,
    ),
    "manifest_not_json": (lambda s, m: (s / "manifest.json").write_bytes(b"{\x00"), "not JSON", True),
    "manifest_field_missing": (
        lambda s, m: (_edit_json(s / "manifest.json", lambda d: d.pop("dtype")), _rechecksum(s / "manifest.json")),
        "field is missing",
        True,
    ),
    "purged_list": (
        lambda s, m: _edit_json(s / "shard-00000.json", lambda d: d["purged"].append(NEXT)),
        "state of store shard 0",
        True,
    ),
    "state_rows": (
        lambda s, m: _edit_json(s / "shard-00000.json", lambda d: d.update(rows=d["rows"] - 1)),
        "fails its checksum",
        True,
    ),
    "state_without_checksum": (
        lambda s, m: _edit_json(s / "shard-00000.json", lambda d: d.pop("checksum")),
        "no checksum",
        True,
    ),
    "state_wrong_type": (
        lambda s, m: (
            _edit_json(s / "shard-00000.json", lambda d: d.update(generation="1")),
            _rechecksum(s / "shard-00000.json"),
        ),
        "wrong type",
        True,
    ),
    "journal_edit": (_pending_journal, "forget journal", False),
    "audit_line_edit": (lambda s, m: _edit_audit_line(s), r"audit log .* damaged at line\(s\) \[1\]", False),
    "lineage_line_edit": (lambda s, m: _edit_lineage_line(s), "lineage file .* damaged at line", True),
    "key_missing": (lambda s, m: (s / "store.key").unlink(), "key .* is missing", True),
    "key_short": (lambda s, m: (s / "store.key").write_bytes(b"k" * 16), "16 bytes", True),
    "key_swapped": (lambda s, m: (s / "store.key").write_bytes(os.urandom(32)), "not this store's key", True),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused_before_anything_changes(copy_of, case, capsys):
    trainer, store, model_dir = copy_of
    damage, message, at_open = DAMAGE[case]
    damage(store, model_dir)
    before = _hashes(store, model_dir)
    weights = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().clone()
    if at_open:
        with pytest.raises(StoreError, match=message):
            StoreReader(store)
    with pytest.raises(StoreError, match=message):
        trainer.forget([NEXT], scale=1.0, repair_steps=0, save_to=model_dir)
    assert _hashes(store, model_dir) == before
    assert not (model_dir.parent / "model.amnesia-staging").exists()
    assert torch.equal(torch.nn.utils.parameters_to_vector(trainer.model.parameters()), weights)
    assert model_record(trainer.model)["count"] == 1  # the record, unchanged
    assert main(["verify", str(store)]) == 2
    assert "hf-amnesia:" in capsys.readouterr().err
    assert _hashes(store, model_dir) == before


def test_an_intact_store_verifies_and_says_what_it_checked(copy_of, capsys):
    _, store, _ = copy_of
    assert main(["verify", str(store)]) == 0
    out = capsys.readouterr().out
    for checked in ("manifest", "1 shard state(s)", "rows", "the key", "1 audit record(s)", "lineage entries"):
        assert checked in out, out
    assert "all checksums match" in out
    assert "momentum tails exact" in out  # a tiny run's tails fit the default budget


def test_a_flipped_id_is_not_forgotten_as_another(copy_of):
    """The review's case: an id flipped in the ids file would have subtracted another id's row."""
    trainer, store, model_dir = copy_of
    ids = np.load(_ids_file(store), allow_pickle=False)
    _flip_an_id(store)
    flipped = np.load(_ids_file(store), allow_pickle=False)
    (new_id,) = set(flipped.tolist()) - set(ids.tolist())
    with pytest.raises(StoreError, match="ids of store shard 0"):
        trainer.forget([new_id], scale=1.0, repair_steps=0, save_to=model_dir)


def test_commits_count_and_roll_forward_is_idempotent(copy_of):
    trainer, store, model_dir = copy_of
    assert Manifest.load(store).commits == 1
    trainer.forget([NEXT], scale=1.0, repair_steps=0, save_to=model_dir)
    registered = len(lineage.entries(store))
    manifest = Manifest.load(store)
    assert manifest.commits == 2 and len(read_audit(store)) == 2
    weights = manifest.final_weights
    entry = prepare(
        model_dir,
        None,
        dict(read_audit(store)[-1], request="again"),
        lineage={"weights": weights, "forgotten": id_digests(load_key(store), [FIRST, NEXT])},
    )
    commit(store, entry)
    assert load_journal(store)["commits_after"] == 3
    roll_forward(store, entry)
    roll_forward(store, entry)  # a repeat changes nothing
    assert Manifest.load(store).commits == 3 and len(read_audit(store)) == 3
    assert lineage.lookup(store, weights) == frozenset(id_digests(load_key(store), [NEXT, FIRST]))
    assert len(lineage.entries(store)) == registered  # the weights already had that entry


def test_a_new_store_has_an_id_a_private_key_and_format_2(served):
    _, store, _ = served
    manifest = Manifest.load(store)
    assert manifest.format_version == FORMAT_VERSION == 2
    assert len(manifest.store_id) == len(manifest.run_id) == 32  # the run that recorded it
    assert manifest.key_check == key_check(load_key(store))
    assert stat.S_IMODE(os.stat(store / "store.key").st_mode) == 0o600
    record = read_audit(store)[0]
    assert record["ids_hmac"] == ids_digest(load_key(store), [FIRST]) and "ids_sha256" not in record
    text = (store / "audit.jsonl").read_text()
    assert '"checksum"' in text and str(FIRST) not in json.loads(text)["ids_hmac"]


# -- keys and lineage ------------------------------------------------------------------------------


def test_keys(tmp_path):
    key = create_key(tmp_path)
    assert len(key) == 32 and (tmp_path / "store.key").read_bytes() == key
    assert stat.S_IMODE(os.stat(tmp_path / "store.key").st_mode) == 0o600
    with pytest.raises(StoreError, match="already exists"):
        create_key(tmp_path)
    digests = id_digests(key, [3, 1, 3])
    assert digests[0] == digests[2] != digests[1] and all(len(d) == 32 for d in digests)
    assert id_digests(key, [1]) != id_digests(os.urandom(32), [1])
    assert ids_digest(key, [3, 1, 1]) == ids_digest(key, np.array([1, 3])) != ids_digest(key, [1])
    assert len(ids_digest(key, [1])) == 64 and len(key_check(key)) == 16
    with pytest.raises(StoreError, match="no manifest"):
        load_key(tmp_path)


def test_a_key_is_never_created_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.key").symlink_to(victim)
    with pytest.raises(StoreError):
        create_key(store)
    assert victim.read_bytes() == b"keep"


def test_lineage_register_lookup_and_torn_tail(tmp_path, caplog):
    assert lineage.lookup(tmp_path, "w1") is None and lineage.entries(tmp_path) == []
    lineage.register(tmp_path, "w1", ["b", "a"])
    lineage.register(tmp_path, "w1", ["a", "b"])  # already recorded: skipped
    assert lineage.lookup(tmp_path, "w1") == frozenset({"a", "b"}) and len(lineage.entries(tmp_path)) == 1
    lineage.register(tmp_path, "w2", [])
    lineage.register(tmp_path, "w1", ["a", "b", "c"])
    assert lineage.lookup(tmp_path, "w1") == frozenset("abc") and lineage.lookup(tmp_path, "w2") == frozenset()
    assert lineage.entries(tmp_path)[0] == {"weights": "w1", "forgotten": ["a", "b"], "count": 2}
    assert stat.S_IMODE(os.stat(tmp_path / "lineage.jsonl").st_mode) == 0o600
    path = tmp_path / "lineage.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"weights": "w3", "forg')  # an interrupted append
    with caplog.at_level(logging.WARNING):
        assert lineage.lookup(tmp_path, "w3") is None and len(lineage.entries(tmp_path)) == 3
    assert "unfinished line" in caplog.text
    lineage.register(tmp_path, "w3", ["d"])  # cuts the unfinished line off
    assert lineage.lookup(tmp_path, "w3") == frozenset("d") and path.read_bytes().endswith(b"}\n")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace('"w2"', '"w9"'), *lines[2:]]) + "\n")
    with pytest.raises(StoreError, match="damaged at line 2"):
        lineage.lookup(tmp_path, "w1")


# -- no symbolic links are followed ---------------------------------------------------------------


def _manifest():
    return Manifest(layout=ParamLayout(("w",), ((10,),)), keep_fraction=0.5, dtype="float32", seed=1)


def test_links_planted_in_the_store_are_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    store = tmp_path / "store"
    store.mkdir()
    _manifest().create(store)
    (store / "manifest.json.tmp").symlink_to(victim)  # a stale temporary that is a link
    Manifest.load(store).save(store)
    assert Manifest.load(store) is not None and not (store / "manifest.json.tmp").exists()
    for name, write in (
        ("audit.jsonl", lambda: append_audit(store, {"request": "r"})),
        ("lineage.jsonl", lambda: lineage.register(store, "w", [])),
        (".lock", lambda: store_lock(store).__enter__()),
    ):
        (store / name).symlink_to(victim)
        with pytest.raises((StoreError, OSError)):
            write()
        assert victim.read_bytes() == b"keep", name


# -- format version 1 and its migration ----------------------------------------------------------


def _to_version_1(store, trainer, model_dir):
    """Rewrite a version-2 store into the shape version 1 wrote (no checksums, no key, no lineage),
    and its model into the shape 0.2 saved (the plain list of forgotten ids in its config)."""
    holder = getattr(trainer.model, "config", trainer.model)
    delattr(holder, "hf_amnesia_forgotten")
    holder.hf_amnesia_forgotten_ids = [FIRST]
    (model_dir / "hf_amnesia.json").unlink(missing_ok=True)
    if (model_dir / "config.json").exists():

        def config(d):
            d.pop("hf_amnesia_forgotten", None)
            d["hf_amnesia_forgotten_ids"] = [FIRST]

        _edit_json(model_dir / "config.json", config)

    def manifest(d):
        for name in ("checksum", "store_id", "run_id", "commits", "key_check"):
            d.pop(name)
        d["format_version"] = 1

    _edit_json(store / "manifest.json", manifest)
    for path in store.glob("shard-*.json"):
        _edit_json(path, lambda d: [d.pop(n) for n in ("checksum", "ids_sha256", "sums_sha256")])
    lines = []
    for line in (store / "audit.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("checksum")
        record["ids_sha256"] = hashlib.sha256(record.pop("ids_hmac").encode()).hexdigest()
        lines.append(json.dumps(record, sort_keys=True) + "\n")
    (store / "audit.jsonl").write_text("".join(lines))
    (store / "store.key").unlink()
    (store / "lineage.jsonl").unlink()


def test_a_version_1_store_is_refused_then_migrated(copy_of, capsys):
    trainer, store, model_dir = copy_of
    _to_version_1(store, trainer, model_dir)
    before = _hashes(store, model_dir)
    with pytest.raises(StoreError, match="hf-amnesia migrate STORE"):
        StoreReader(store)
    with pytest.raises(StoreError, match="hf-amnesia migrate STORE"):
        trainer.forget([NEXT], scale=1.0, repair_steps=0, save_to=model_dir)
    assert _hashes(store, model_dir) == before
    assert main(["migrate", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["migrated"] is True
    manifest = Manifest.load(store)
    assert manifest.format_version == 2 and manifest.commits == 1 and len(manifest.store_id) == 32
    key = load_key(store)
    assert lineage.lookup(store, manifest.final_weights) == frozenset(id_digests(key, [FIRST]))
    old = read_audit(store)[0]  # the old record, kept, now checksummed, without its reversible digest
    assert old["request"] and "ids_sha256" not in old
    assert main(["verify", str(store)]) == 0 and "all checksums match" in capsys.readouterr().out
    assert main(["migrate", str(store)]) == 0  # already version 2: nothing to do
    assert json.loads(capsys.readouterr().out)["migrated"] is False
    report = trainer.forget([NEXT], scale=1.0, repair_steps=0, save_to=model_dir)
    assert report.forgotten == [NEXT] and Manifest.load(store).commits == 2
    assert read_audit(store)[-1]["ids_hmac"] == ids_digest(key, [NEXT])
    assert not StoreReader(store).locate(NEXT)


def test_an_interrupted_migration_leaves_version_1_and_runs_again(copy_of, monkeypatch):
    trainer, store, model_dir = copy_of
    _to_version_1(store, trainer, model_dir)

    def crash(self, store_dir):
        raise OSError("disk full")

    monkeypatch.setattr(Manifest, "save", crash)  # everything but the manifest is rewritten
    with pytest.raises(OSError, match="disk full"):
        migrate(store)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="hf-amnesia migrate"):
        StoreReader(store)
    key = (store / "store.key").read_bytes()
    assert migrate(store) is True
    assert (store / "store.key").read_bytes() == key and len(lineage.entries(store)) == 1
    assert StoreReader(store).check_all().rows > 0
    trainer.forget([NEXT], scale=1.0, repair_steps=0, save_to=model_dir)


def test_a_pending_version_1_journal_is_migrated_and_recovered(copy_of):
    trainer, store, model_dir = copy_of
    audit = dict(read_audit(store)[0], request="feedfeed")
    commit(store, prepare(model_dir, np.array([NEXT]), audit))  # a request a crash interrupted
    _to_version_1(store, trainer, model_dir)
    _edit_json(store / "forget-journal.json", lambda d: [d.pop(n) for n in ("checksum", "commits_after", "lineage")])
    with pytest.raises(StoreError, match="hf-amnesia migrate STORE"):
        recover(store)
    assert migrate(store) is True
    assert load_journal(store)["commits_after"] == 2
    assert recover(store) is True
    assert Manifest.load(store).commits == 2 and len(read_audit(store)) == 2
    assert not StoreReader(store).locate(NEXT) and load_journal(store) is None


def test_migration_refuses_a_damaged_row_and_a_damaged_manifest(copy_of):
    trainer, store, model_dir = copy_of
    _to_version_1(store, trainer, model_dir)
    rows = next(store.glob("shard-00000.g*.rows"))
    _flip_last_byte(rows)
    with pytest.raises(StoreError, match="fail their checksums"):
        migrate(store)
    (store / "manifest.json").write_text("[]")
    with pytest.raises(StoreError, match="not a JSON object"):
        migrate(store)
