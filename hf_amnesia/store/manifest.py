"""The store's manifest (`manifest.json`): what was recorded, how, and by which version.

It fixes the parameter layout and its fingerprint, keep_fraction and keep layout (hence K),
the store dtype, the seed, the number of shards, the decay factors and the fingerprint of the
weights the last run (or forget) left; it names the store (`store_id`), its last recording run
(`run_id`), counts its committed forget requests (`commits`) and holds the check value of its key
(`key_check`). A `checksum` field covers all the others (`checksums.py`), checked on every load.
A store of format version 1 is refused with the way to migrate it (`hf-amnesia migrate STORE`);
one of another version is refused.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError
from ..layout import ParamLayout
from ..version import __version__
from .checksums import RESTORE, dump, fields, load_json, parse_json, read_file
from .encoding import STORE_DTYPES
from .files import MANIFEST_NAME, write_atomic
from .keys import KEY_BYTES, create_key, key_check, key_path, read_key
from .positions import KEEP_LAYOUTS, num_kept, row_plan

FORMAT_VERSION = 2


@dataclass
class Manifest:
    """The settings a store was recorded with (each field: docs/store-format.md)."""

    layout: ParamLayout
    keep_fraction: float
    dtype: str
    seed: int
    num_shards: int = 1
    decay: list[float] = field(default_factory=list)  # Q per tensor, in layout order
    keep_layout: str = (
        "entries"  # which entries a sample keeps: random `entries`, or whole `rows` (new stores: see config)
    )
    final_weights: str | None = None  # fingerprint of the weights when the last recorded run finished
    store_id: str | None = None  # uuid4 hex, made once when the store is created (`create`)
    run_id: str | None = None  # the id of the recording run that last started
    commits: int = 0  # forget requests committed into this store
    key_check: str | None = None  # public check value of the store's key (`keys.key_check`)
    # None: every run's momentum tails were exact; else the fewest steps a run kept them open
    # before estimating their rest (bounded tails, `attribution.MomentumLedger`)
    bounded_tail_steps: int | None = None
    format_version: int = FORMAT_VERSION
    library_version: str = __version__

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def k(self) -> int:
        if self.keep_layout == "rows":
            return sum(r * c for _, c, r in row_plan(self.keep_fraction, self.layout.shapes))
        return num_kept(self.keep_fraction, self.num_params)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "layout_fingerprint": self.layout.fingerprint(),
            "num_params": self.num_params,
            "keep_fraction": self.keep_fraction,
            "keep_layout": self.keep_layout,
            "final_weights": self.final_weights,
            "store_id": self.store_id,
            "run_id": self.run_id,
            "commits": self.commits,
            "key_check": self.key_check,
            "bounded_tail_steps": self.bounded_tail_steps,
            "k": self.k,
            "dtype": self.dtype,
            "seed": self.seed,
            "num_shards": self.num_shards,
            "decay": list(self.decay),
            "layout": self.layout.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict, path: Path | str = MANIFEST_NAME) -> Manifest:
        """The manifest in `data` (a checked `manifest.json`); any field missing, of the wrong type or
        inconsistent with the others is a `StoreError` naming `path`."""
        version = data.get("format_version")
        if version == 1:
            raise StoreError(
                f"the store of {path} has format version 1, which hf_amnesia {__version__} reads only after "
                f"migrating it to version {FORMAT_VERSION}: run `hf-amnesia migrate STORE` on that folder (it "
                "adds checksums to every file the forget path reads, and the store's key), then retry."
            )
        if version != FORMAT_VERSION:
            raise StoreError(
                f"store format version {version} of {path} is not readable by hf_amnesia {__version__} (reads "
                f"version {FORMAT_VERSION}); install the version that wrote it ({data.get('library_version')})."
            )
        manifest = fields(path, "the store manifest", lambda: cls._fields(data))
        problem = manifest._inconsistency(data)
        if problem:
            raise StoreError(f"the store manifest {path} is damaged: {problem}. {RESTORE}")
        return manifest

    @classmethod
    def _fields(cls, data: dict) -> Manifest:
        return cls(
            layout=ParamLayout.from_json(_typed(data, "layout", list)),
            keep_fraction=float(_typed(data, "keep_fraction", (int, float))),
            dtype=_typed(data, "dtype", str),
            seed=_typed(data, "seed", int),
            num_shards=_typed(data, "num_shards", int),
            decay=[float(_typed({"decay": q}, "decay", (int, float))) for q in _typed(data, "decay", list)],
            keep_layout=_typed(data, "keep_layout", str),
            final_weights=_typed(data, "final_weights", (str, type(None))),
            store_id=_typed(data, "store_id", (str, type(None))),
            run_id=_typed(data, "run_id", (str, type(None))),
            commits=_typed(data, "commits", int),
            key_check=_typed(data, "key_check", (str, type(None))),
            bounded_tail_steps=_typed(
                {"bounded_tail_steps": data.get("bounded_tail_steps")}, "bounded_tail_steps", (int, type(None))
            ),
            format_version=_typed(data, "format_version", int),
            library_version=_typed(data, "library_version", str),
        )

    def _inconsistency(self, data: dict) -> str | None:
        """What is inconsistent in a loaded manifest (None: nothing)."""
        if self.layout.fingerprint() != data.get("layout_fingerprint"):
            return "its layout does not match its fingerprint"
        if self.dtype not in STORE_DTYPES or self.keep_layout not in KEEP_LAYOUTS:
            return f"dtype {self.dtype!r} or keep_layout {self.keep_layout!r} is not one hf_amnesia writes"
        if self.bounded_tail_steps is not None and self.bounded_tail_steps < 1:
            return "bounded_tail_steps is below 1"
        if not 0 < self.keep_fraction <= 1 or self.seed < 0 or self.num_shards < 1 or self.commits < 0:
            return "keep_fraction, seed, num_shards or commits is out of range"
        if data.get("num_params") != self.num_params or data.get("k") != self.k:
            return "num_params or k does not follow from its layout and keep_fraction"
        if self.decay and len(self.decay) != len(self.layout.names):
            return f"it holds {len(self.decay)} decay factors for {len(self.layout.names)} tensors"
        return None

    def note_tails(self, max_open: int | None) -> None:
        """Record a run's tail mode: tails closed after `max_open` steps with their rest estimated, or
        exact (None)."""
        if max_open is not None:
            self.bounded_tail_steps = min(max_open, self.bounded_tail_steps or max_open)

    def create(self, store_dir: Path) -> None:
        """Save this manifest as that of a new store: its key and `store_id` are made first, the
        manifest written last (the store exists once its manifest does)."""
        key = read_key(store_dir)  # left by a creation interrupted before its manifest was written
        if key is None or len(key) != KEY_BYTES:
            key_path(store_dir).unlink(missing_ok=True)  # no manifest refers to it
            key = create_key(store_dir)
        self.store_id = uuid.uuid4().hex
        self.key_check = key_check(key)
        self.save(store_dir)

    def save(self, store_dir: Path) -> None:
        """Write `manifest.json` atomically, with its checksum."""
        write_atomic(Path(store_dir) / MANIFEST_NAME, dump(self.to_json(), indent=1))

    @classmethod
    def load(cls, store_dir: Path) -> Manifest | None:
        """The store's manifest, its checksum checked (None if there is no `manifest.json`)."""
        path = Path(store_dir) / MANIFEST_NAME
        if not path.exists() and not path.is_symlink():
            return None
        data = parse_json(read_file(path, "the store manifest"), path, "the store manifest")
        if data.get("format_version") == FORMAT_VERSION:  # an older version is named before its checksum
            data = load_json(path, "the store manifest")
        return cls.from_json(data, path)


def _typed(data: dict, key: str, types):
    """`data[key]`, a `TypeError` if it is not of `types` (a bool is not an int here)."""
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{key} is {type(value).__name__}")
    return value
