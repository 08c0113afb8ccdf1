"""The `hf-amnesia` command: serve forget requests, show the audit log, check a store.

hf-amnesia forget --model saved_model --store run/_amnesia_store --ids 12 40 977
hf-amnesia forget --model saved_model --store run/_amnesia_store --ids-file request.txt
hf-amnesia audit run/_amnesia_store
hf-amnesia verify run/_amnesia_store
hf-amnesia migrate run/_amnesia_store  # a store of format version 1 to version 2
hf-amnesia recover run/_amnesia_store  # finish a forget request a crash interrupted
hf-amnesia holders run              # checkpoints that may still hold forgotten influence
hf-amnesia plan gpt2_folder --rows 50000 --batch-size 8 --epochs 3   # what recording will cost

Exit codes: 0 served; 2 refused, nothing changed; 3 committed but not finished (run
`hf-amnesia recover STORE`); 4 served in part: ids in "purged_elsewhere" still influence the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import AmnesiaError, ForgetIncompleteError
from .store.files import JOURNAL, MANIFEST_NAME

SERVED, REFUSED, INCOMPLETE, PARTLY = 0, 2, 3, 4


class CliError(Exception):
    """A request the command refuses before it changes anything (exit code 2)."""


def _read_ids(args) -> list[int]:
    tokens = list(args.ids or [])
    if args.ids_file:
        try:
            text = Path(args.ids_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(
                f"cannot read the ids file {args.ids_file} ({err}); give a UTF-8 (or ASCII) text file "
                "of integer ids separated by whitespace or commas."
            ) from None
        tokens += text.replace(",", " ").split()
    ids = []
    for token in tokens:
        if not token.isascii() or not token.isdigit():  # int() would also take "1_5", "+3" or " 7"
            raise CliError(f"{token!r} is not an integer id; give ids as plain decimal digits.")
        ids.append(int(token))
    if not ids:
        raise CliError("no ids given; use --ids 1 2 3 or --ids-file FILE.")
    return ids


def _load_model(model_dir: str, base_dir: str | None):
    import transformers

    if not Path(model_dir).is_dir():
        raise CliError(
            f"the model folder {model_dir} does not exist (a local folder written by save_pretrained "
            "is expected). If a forget request was interrupted, `hf-amnesia recover STORE` finishes it first."
        )
    if (Path(model_dir) / "adapter_config.json").is_file():
        return _load_adapter(model_dir, base_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    names = getattr(config, "architectures", None) or []
    if not names or not hasattr(transformers, names[0]):
        raise CliError(
            f"cannot tell the model class of {model_dir} (config.architectures={names}); "
            "forget from Python with AmnesiacTrainer instead."
        )
    return getattr(transformers, names[0]).from_pretrained(model_dir)


def _load_adapter(adapter_dir: str, base_dir: str | None):
    """A PEFT adapter folder on its base model (`--base`, or the adapter's `base_model_name_or_path`)."""
    try:
        import peft
    except ImportError:
        raise CliError(
            f"{adapter_dir} holds a PEFT adapter; install peft (pip install peft) to forget from it."
        ) from None
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base_dir = base_dir or config.get("base_model_name_or_path")
    if not base_dir or not Path(base_dir).is_dir():
        raise CliError(
            f"the adapter at {adapter_dir} names its base model {base_dir!r}, which is not a local folder; give the "
            "base model's folder with --base BASE_DIR."
        )
    base = _load_model(base_dir, None)
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  # trainable: the store's layout


def cmd_forget(args) -> int:
    from .config import AmnesiaConfig
    from .trainer import AmnesiacTrainer

    ids = _read_ids(args)
    _recover(args.store)  # an interrupted request may have left the model folder mid-swap
    model = _load_model(args.model, args.base)
    with tempfile.TemporaryDirectory() as tmp:
        config = AmnesiaConfig(output_dir=tmp, store_dir=args.store, report_to="none", use_cpu=True)
        trainer = AmnesiacTrainer(model=model, args=config)
        report = trainer.forget(
            ids,
            scale=args.scale,
            repair_steps=0,
            strict=args.strict,
            save_to=args.save_to or args.model,
            purge=not args.no_purge,
        )
    print(
        json.dumps(
            {
                "forgotten": len(report.forgotten),
                "already_forgotten": len(report.already_forgotten),
                "unknown": report.unknown,
                "purged_elsewhere": report.purged_elsewhere,
                "delta_norm": report.delta_norm,
                "seconds": round(report.seconds, 3),
                "saved_to": args.save_to or args.model,
                "request": report.request,
            }
        )
    )
    if report.purged_elsewhere:
        print(
            f"hf-amnesia: {len(report.purged_elsewhere)} id(s) were purged from the store when another model forgot "
            "them; this model still holds their influence (see purged_elsewhere). Forget from that model, or retrain.",
            file=sys.stderr,
        )
        return PARTLY
    return SERVED


def _recover(store: str) -> bool:
    """Finish or undo, under the store's lock, a forget request a crash interrupted."""
    from .store.journal import recover, store_lock

    if not (Path(store) / MANIFEST_NAME).is_file():
        return False
    with store_lock(store, purpose="recovery"):
        return recover(store)


def _store_folder(store: str) -> None:
    if not (Path(store) / MANIFEST_NAME).is_file():
        raise CliError(f"{store} is not a store folder (it has no {MANIFEST_NAME}).")


def cmd_recover(args) -> int:
    _store_folder(args.store)
    completed = _recover(args.store)
    print(json.dumps({"store": args.store, "completed_request": completed}))
    return 0


def cmd_audit(args) -> int:
    from .store.audit import load_audit

    _store_folder(args.store)
    log = load_audit(args.store)
    records = log.records
    if log.damaged:
        print(
            f"hf-amnesia: warning: line(s) {log.damaged[:10]} of the audit log are not records; the readable "
            "ones follow. Forget requests that save are refused until the log is repaired.",
            file=sys.stderr,
        )
    if log.torn:
        print(
            f"hf-amnesia: warning: the audit log ends with an unfinished record ({len(log.torn)} bytes, an "
            "interrupted append); the next committed request moves it to audit.jsonl.torn.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print(f"{len(records)} forget request(s) in {args.store}")
    for r in records:
        r = {"time": "?", "count": "?", "forgotten": "?", "already_forgotten": "?", "unknown": "?", **r}
        print(
            f"{r['time']}  request {str(r['request'])[:12]}  ids {r['count']} (forgotten {r['forgotten']}, already "
            f"{r['already_forgotten']}, unknown {r['unknown']})  |delta| {r.get('delta_norm', float('nan')):.4g}  "
            f"model {str(r.get('model_before'))[:12]} -> {str(r.get('model_after'))[:12]}  "
            f"purged {r.get('purged')}  saved {r.get('saved_to')}"
        )
    return 0


def cmd_verify(args) -> int:
    from .store import StoreReader

    if not Path(args.store).is_dir():
        raise CliError(f"{args.store} is not a store folder.")
    reader = StoreReader(args.store)
    print(f"{args.store}: {reader.check_all().summary()}")
    steps = reader.manifest.bounded_tail_steps
    tails = "exact" if steps is None else f"bounded: closed after {steps} steps, their rest estimated (docs/limits.md)"
    print(f"{args.store}: momentum tails {tails}")
    return 0


def cmd_migrate(args) -> int:
    from .store.migrate import migrate

    if not Path(args.store).is_dir():
        raise CliError(f"{args.store} is not a store folder.")
    migrated = migrate(args.store)
    print(json.dumps({"store": args.store, "migrated": migrated}))
    return 0


def cmd_holders(args) -> int:
    from .trainer import influence_holders

    for path in influence_holders(args.output_dir):
        print(path)
    return 0


def cmd_plan(args) -> int:
    from .planning import meta_model, plan

    targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
    model = meta_model(args.model, args.lora_r, targets)
    result = plan(
        model, args.rows, args.batch_size, args.epochs, args.keep_fraction, args.keep_layout, args.store_dtype,
        args.gradient_accumulation_steps, args.processes, tail_memory_budget_mb=args.tail_memory_budget_mb,
        sum_deltas_in_memory={"auto": None, "on": True, "off": False}[args.sum_deltas_in_memory],
    )  # fmt: skip
    print(json.dumps(result.to_json()) if args.json else result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-amnesia", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    forget = sub.add_parser("forget", help="forget ids from a saved model and purge them from the store")
    forget.add_argument("--model", required=True, help="folder of the saved model (save_pretrained) or PEFT adapter")
    forget.add_argument("--base", help="for an adapter folder: its base model's folder (default: from its config)")
    forget.add_argument("--store", required=True, help="the store folder")
    forget.add_argument("--ids", nargs="*", help="integer dataset ids")
    forget.add_argument("--ids-file", help="file of integer ids, separated by whitespace or commas")
    forget.add_argument("--scale", type=float, default=1.0)
    forget.add_argument("--save-to", help="where to save the new model (default: replace --model)")
    forget.add_argument("--no-purge", action="store_true", help="keep the ids' rows in the store")
    forget.add_argument("--strict", action="store_true", help="refuse the request if an id is unknown")
    forget.set_defaults(run=cmd_forget)
    audit = sub.add_parser("audit", help="show the audit log of a store")
    audit.add_argument("store")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(run=cmd_audit)
    verify = sub.add_parser("verify", help="check every checksum of a store: metadata, ids, rows, logs, key")
    verify.add_argument("store")
    verify.set_defaults(run=cmd_verify)
    migrate = sub.add_parser("migrate", help="migrate a store of format version 1 to version 2, in place")
    migrate.add_argument("store")
    migrate.set_defaults(run=cmd_migrate)
    recover = sub.add_parser("recover", help="finish (or undo) a forget request a crash interrupted")
    recover.add_argument("store")
    recover.set_defaults(run=cmd_recover)
    holders = sub.add_parser("holders", help="list checkpoints that may still hold forgotten influence")
    holders.add_argument("output_dir")
    holders.set_defaults(run=cmd_holders)
    planner = sub.add_parser("plan", help="what recording a training run will cost: store, tail memory, copies")
    planner.add_argument("model", help="a folder holding config.json, or a model name")
    planner.add_argument("--rows", type=int, required=True, help="training rows")
    planner.add_argument("--batch-size", type=int, required=True, help="per_device_train_batch_size")
    planner.add_argument("--epochs", type=float, default=1.0)
    planner.add_argument("--keep-fraction", type=float, default=0.01)
    planner.add_argument("--keep-layout", default="rows")
    planner.add_argument("--store-dtype", help="default: float32 with --lora-r, float16 otherwise")
    planner.add_argument("--gradient-accumulation-steps", type=int, default=1)
    planner.add_argument("--processes", type=int, default=1, help="training processes (DDP)")
    planner.add_argument("--tail-memory-budget-mb", type=float, default=1024.0)
    planner.add_argument(
        "--sum-deltas-in-memory", choices=["auto", "on", "off"], default="auto",
        help="auto (the default): on when the sums take at most 1 GiB, as for a datasets.Dataset",
    )  # fmt: skip
    planner.add_argument("--lora-r", type=int, default=0, help="plan a LoRA fine-tune of this rank")
    planner.add_argument("--lora-target-modules", help="comma-separated module names for --lora-r")
    planner.add_argument("--json", action="store_true")
    planner.set_defaults(run=cmd_plan)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except ForgetIncompleteError as err:
        print(f"hf-amnesia: {err}", file=sys.stderr)
        return INCOMPLETE
    except (AmnesiaError, CliError) as err:
        print(f"hf-amnesia: {err}", file=sys.stderr)
        return REFUSED
    except Exception as err:  # a bug or the system's error: told, never as a traceback
        store = getattr(args, "store", None)
        if store and (Path(store) / JOURNAL).exists():
            print(
                f"hf-amnesia: {type(err).__name__}: {err}; a request is committed but not finished: run "
                f"`hf-amnesia recover {store}`.",
                file=sys.stderr,
            )
            return INCOMPLETE
        print(f"hf-amnesia: {type(err).__name__}: {err}; the request changed nothing.", file=sys.stderr)
        return REFUSED


if __name__ == "__main__":
    sys.exit(main())
