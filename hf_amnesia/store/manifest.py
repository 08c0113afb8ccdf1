"""The store's manifest (`manifest.json`): what was recorded, how, and by which version.

It fixes the parameter layout and its fingerprint, keep_fraction and keep layout (hence K),
the store dtype, the seed, the number of shards, the decay factors and the fingerprint of the
weights the last run (or forget) left. A store of another format version is refused.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError
from ..layout import ParamLayout
from ..version import __version__
from .files import MANIFEST_NAME, write_atomic
from .keys import KEY_BYTES, create_key, key_check, key_path, read_key
from .positions import num_kept, row_plan

FORMAT_VERSION = 1


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
            "k": self.k,
            "dtype": self.dtype,
            "seed": self.seed,
            "num_shards": self.num_shards,
            "decay": list(self.decay),
            "layout": self.layout.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"store format version {data.get('format_version')} is not readable by hf_amnesia "
                f"{__version__} (reads version {FORMAT_VERSION}); install the version that wrote it "
                f"({data.get('library_version')})."
            )
        layout = ParamLayout.from_json(data["layout"])
        if layout.fingerprint() != data["layout_fingerprint"]:
            raise StoreError("store manifest is damaged: its layout does not match its fingerprint.")
        return cls(
            layout=layout,
            keep_fraction=float(data["keep_fraction"]),
            dtype=data["dtype"],
            seed=int(data["seed"]),
            num_shards=int(data["num_shards"]),
            decay=[float(q) for q in data["decay"]],
            keep_layout=data.get("keep_layout", "entries"),
            final_weights=data.get("final_weights"),
            store_id=data.get("store_id"),
            run_id=data.get("run_id"),
            commits=int(data.get("commits", 0)),
            key_check=data.get("key_check"),
            format_version=int(data["format_version"]),
            library_version=data["library_version"],
        )

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
        write_atomic(store_dir / MANIFEST_NAME, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, store_dir: Path) -> Manifest | None:
        path = Path(store_dir) / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"cannot read store manifest {path}: {err}") from err
        return cls.from_json(data)
