"""The `hstore` command: look at, check and measure a store from the shell.

    hstore stats ROOT [--json]          summary, read-only, never takes the lock
    hstore stats [ROOT] --remote URL    ... and the remote tier's servers and namespace
    hstore recover ROOT [--nvme-dir D]  rebuild a lost or damaged index from the data files
    hstore verify ROOT [--repair]       read back and check every record
    hstore bench ROOT [...]             tier bandwidth next to the hardware's
    hstore bench ROOT --remote URL      the remote tier's GB/s next to plain redis-py

The commands are thin: `hstore.ondisk` and `hstore_bench` (outside the library) do the work and
return data; this module parses arguments, draws progress bars on stderr and
formats results on stdout. Expected failures (no store there, store in use,
I/O errors) print one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
from importlib import metadata
from typing import Sequence

from hstore.errors import HStoreError, StoreLockedError

EXIT_OK = 0
EXIT_PROBLEMS = 1  # verify found bad entries, or the command failed (store in use, I/O error)
EXIT_USAGE = 2  # bad arguments, or ROOT is not a store

_EPILOG = """\
exit status:
  0  success
  1  problems found (verify: bad entries, even when --repair removed them),
     or the command failed (store in use by another process, I/O error)
  2  usage error (bad arguments, ROOT is not an hstore store)
"""


def _version() -> str:
    try:
        return metadata.version("hstore-hcache")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _size_arg(text: str) -> int:
    from hstore.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes_arg(text: str) -> list[int]:
    sizes = [_size_arg(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"no sizes in {text!r}")
    return sizes


def _tiers_arg(text: str) -> list[str]:
    from hstore_bench import TIERS

    tiers = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in tiers if t not in TIERS]
    if bad or not tiers:
        raise argparse.ArgumentTypeError(f"tiers must be a comma-separated subset of {','.join(TIERS)}, got {text!r}")
    return tiers


def _remote_arg(text: str) -> str:
    """A remote URL that parses (no connection yet); argparse shows the redacted reason."""
    from hstore.errors import StoreConfigError
    from hstore.tiers.remote.config import RemoteConfig

    try:
        RemoteConfig(text)
    except StoreConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _wrap(text: str) -> str:
    """Descriptions are wrapped here, since the raw formatter (kept for the epilog's table) does not."""
    return textwrap.fill(text, width=min(shutil.get_terminal_size().columns, 100) - 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hstore",
        description=_wrap("Inspect, verify and benchmark an hstore tiered tensor store."),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "stats", help="summarise a store without opening it for writing",
        description=_wrap("Summarise the store at ROOT from its index, read-only: items, bytes per NVMe data file, "
                    "dtypes, oldest/newest item, file sizes and free space. Safe while the store is in use "
                    "(takes no lock)."),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", metavar="ROOT", nargs="?", help="the store's root directory (optional with --remote)")
    p.add_argument("--remote", metavar="URL", type=_remote_arg,
                   help="also summarise the remote tier at URL (redis://, rediss://, redis+cluster://; "
                        "?namespace=NAME for another namespace): its servers' memory and eviction settings "
                        "and the namespace's keys")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "verify", help="read back and check every record",
        description=_wrap("Open the store at ROOT (takes its lock: fails if another process has it open), read every "
                    "indexed record through the NVMe tier and check its header, key and checksum. Exits 1 if "
                    "any record is bad."),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", metavar="ROOT", help="the store's root directory")
    p.add_argument("--repair", action="store_true", help="delete the bad entries from the store")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--batch", type=_size_arg, default="64M", metavar="SIZE", help="bytes read per batch (default 64M)")
    p.add_argument("--engine", choices=["auto", "uring", "threads"], default="auto", help="I/O engine (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "recover", help="rebuild a lost or damaged index from the data files",
        description=_wrap("Rebuild the index of the store at ROOT from its data files' record headers, keeping per "
                    "key the newest record whose checksum verifies. The old index folder is moved aside "
                    "(ROOT/index.damaged-...), never deleted. Takes the store's lock. Records written before "
                    "format 2 (and keys over 3.7 KiB) name their key only by a digest: they are counted, not "
                    "recovered. Keys deleted whose space was not reused yet come back."),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", metavar="ROOT", help="the store's root directory")
    p.add_argument("--nvme-dir", action="append", metavar="DIR", dest="nvme_dirs",
                   help="an NVMe directory of the store, in order (repeat; default: as recorded, else ROOT/nvme)")
    p.add_argument("--engine", choices=["auto", "uring", "threads"], default="auto", help="I/O engine (default auto)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser(
        "bench", help="measure tier bandwidth against the raw device and pinned H2D copies",
        description=_wrap("Measure write and read bandwidth of each tier through the store's public API, next to raw "
                    "O_DIRECT sequential reads of the same directory and (with CUDA) pinned host-to-device "
                    "copies. Works in a private directory under ROOT (created if needed) and removes it."),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", metavar="ROOT", nargs="?", help="a directory on the device to measure "
                   "(not needed for --remote alone)")
    p.add_argument("--sizes", type=_sizes_arg, default="256K,512K,1M,2M,4M,8M", metavar="LIST",
                   help="chunk sizes, comma-separated (default 256K,512K,1M,2M,4M,8M)")
    p.add_argument("--total", type=_size_arg, default="512M", metavar="SIZE",
                   help="bytes moved per measurement (default 512M)")
    p.add_argument("--tiers", type=_tiers_arg, metavar="LIST",
                   help="tiers to measure, comma-separated (default dram,nvme,gpu, or none with --remote; "
                        "gpu needs CUDA)")
    p.add_argument("--remote", metavar="URL", type=_remote_arg,
                   help="measure the remote tier at URL next to plain redis-py GET/SET of the same sizes "
                        "(writes under a private namespace and removes it)")
    p.add_argument("--engine", choices=["auto", "uring", "threads"], default="auto",
                   help="NVMe I/O engine (default auto)")
    p.add_argument("--queue-depth", type=_positive_int, default=64, metavar="N",
                   help="io_uring queue depth (default 64)")
    p.add_argument("--repeat", type=_positive_int, default=3, metavar="N",
                   help="repetitions; medians are reported (default 3)")
    p.add_argument("--batch", type=_size_arg, default="64M", metavar="SIZE",
                   help="get_many_into batch on the restore path (default 64M)")
    p.add_argument("--torch-threads", type=_positive_int, metavar="N",
                   help="torch intra-op threads during the run (default: torch's own choice)")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV to FILE ('-' for stdout)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------- stats
def cmd_stats(args: argparse.Namespace) -> int:
    if args.root is None and args.remote is None:
        return _usage_error(args, "give ROOT, --remote URL, or both")
    remote = _remote_summary(args.remote) if args.remote else None
    if args.root is None:
        print(json.dumps({"remote": remote}, indent=2) if args.json else _format_remote_summary(remote))
        return EXIT_OK
    from hstore.ondisk import summarize

    s = summarize(args.root)
    if args.json:
        print(json.dumps({**s, "remote": remote} if remote else s, indent=2))
        return EXIT_OK
    print(_format_store_summary(s))
    if remote:
        print(_format_remote_summary(remote))
    return EXIT_OK


def _remote_summary(url: str) -> dict:
    from hstore.tiers.remote import RedisTier

    tier = RedisTier(url)
    try:
        return {"url": tier.config.url, "namespace": tier.config.namespace,
                "mode": tier.stats()["mode"], "servers": tier.describe()}
    finally:
        tier.close()


def _format_remote_summary(r: dict) -> str:
    from hstore.units import human_bytes

    out = [f"remote       {r['url']} ({r['mode']}), namespace {r['namespace']!r}"]
    if not r["servers"]:
        out.append("  no server reachable")
    for s in r["servers"]:
        if "error" in s:
            out.append(f"  {s['server']}: unreachable ({s['error']})")
            continue
        maxmem = human_bytes(s["maxmemory"]) if s["maxmemory"] else "no maxmemory"
        advice = "" if s["maxmemory"] and s["maxmemory_policy"] == "allkeys-lru" else \
            "  (deploy with maxmemory + allkeys-lru)"
        out.append(f"  {s['server']}: redis {s['redis_version']}, used {human_bytes(s['used_memory'])} of {maxmem}, "
                   f"policy {s['maxmemory_policy']}, {s['evicted_keys']} evicted; namespace "
                   f"{s['namespace_keys']} keys, {human_bytes(s['namespace_value_bytes'])}{advice}")
    return "\n".join(out)


def _format_store_summary(s: dict) -> str:
    from hstore.units import human_bytes

    state = f"in use by pid {s['in_use_by_pid']}" if s["in_use"] else "not open"
    out = [
        f"store        {s['root']} ({state})",
        f"items        {s['items']}   payload {human_bytes(s['payload_bytes'])}, "
        f"stored {human_bytes(s['stored_bytes'])} (with headers and padding)",
    ]
    if s["items"]:
        out.append(f"item sizes   smallest {human_bytes(s['smallest_item_bytes'])}, "
                   f"largest {human_bytes(s['largest_item_bytes'])}")
        o, n = s["oldest"], s["newest"]
        out.append(f"oldest       {o['created_iso']}  {o['key']}")
        out.append(f"newest       {n['created_iso']}  {n['key']}")
        out.append(f"last access  {s['last_access_iso'] or '-'}   total hits {s['total_hits']}")
    out.append(f"index        {human_bytes(s['index_file_bytes'])}, {s['index_records']} records"
               + (f", {s['undecodable_records']} undecodable" if s["undecodable_records"] else ""))
    if s["orphan_items"]:
        out.append(f"orphans      {s['orphan_items']} items name an NVMe device the layout does not have")
    if s["dtypes"]:
        out.append("dtypes")
        width = max(len(k) for k in s["dtypes"])
        for name, d in s["dtypes"].items():
            out.append(f"  {name.ljust(width)}  {d['items']:>10} items  {human_bytes(d['bytes']):>11}")
    if s["devices"]:
        out.append("nvme files")
        for d in s["devices"]:
            if not d["exists"]:
                out.append(f"  #{d['device']} {d['file']}: MISSING ({d['items']} items indexed there)")
                continue
            out.append(
                f"  #{d['device']} {d['file']}: {human_bytes(d['file_bytes'])} "
                f"(allocated {human_bytes(d['allocated_bytes'])}), {d['items']} items, "
                f"stored {human_bytes(d['stored_bytes'])}, free in file {human_bytes(d['free_in_file_bytes'])}; "
                f"filesystem {human_bytes(d['fs_free_bytes'])} free of {human_bytes(d['fs_total_bytes'])}"
            )
    else:
        out.append("nvme files   none (no NVMe tier recorded)")
    return "\n".join(out)


# ---------------------------------------------------------------------------- verify
class _Bar:
    """A tqdm bar on stderr driven by (done, total) callbacks; nothing when disabled."""

    def __init__(self, enabled: bool, **kwargs):
        self.enabled = enabled
        self.kwargs = kwargs
        self.bar = None

    def __call__(self, done: int, total: int, label: str | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, **self.kwargs)
        if label is not None:
            self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @classmethod
    def run(cls, args: argparse.Namespace, work, **kwargs):
        """`work(bar)` with a progress bar (unless --no-progress) that is closed however it ends."""
        bar = cls(not args.no_progress, **kwargs)
        try:
            return work(bar)
        finally:
            bar.close()


def cmd_verify(args: argparse.Namespace) -> int:
    from hstore.units import human_bytes
    from hstore.ondisk import display_key, verify_store

    report = _Bar.run(args, lambda bar: verify_store(args.root, repair=args.repair, batch_bytes=args.batch,
                                                     io_engine=args.engine, progress=bar),
                      desc="verify", unit="B", unit_scale=True, unit_divisor=1024)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"checked {report.items} items ({human_bytes(report.bytes_checked)}) in {report.seconds:.1f} s: "
            f"{report.ok} ok, {len(report.corrupt)} corrupt, {len(report.unreadable)} unreadable"
            + (f", {len(report.dropped_at_open)} invalid index entries" if report.dropped_at_open else "")
        )
        for what, keys in (("corrupt", report.corrupt), ("unreadable", report.unreadable)):
            for k in keys[:20]:
                print(f"  {what}: {display_key(k, 120)}")
            if len(keys) > 20:
                print(f"  ... and {len(keys) - 20} more {what}")
        if report.dropped_at_open:
            print(f"  {len(report.dropped_at_open)} index entries pointed outside the data files or overlapped; "
                  "the store removed them when it opened")
        if report.repaired:
            print(f"repaired: deleted {report.repaired} bad entries")
        elif report.corrupt or report.unreadable:
            print("run with --repair to delete the bad entries")
    return EXIT_PROBLEMS if report.bad else EXIT_OK


# ---------------------------------------------------------------------------- recover
def cmd_recover(args: argparse.Namespace) -> int:
    from hstore.ondisk import recover_store

    report = recover_store(args.root, nvme_dirs=args.nvme_dirs, io_engine=args.engine)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    print(f"recovered {report.recovered} keys from {report.records} verified records in {report.seconds:.1f} s "
          f"({report.superseded} older versions skipped)")
    if report.digest_only:
        print(f"  {report.digest_only} records name their key only by a digest (format 1, or keys over 3.7 KiB): "
              "not recoverable, their space is reused")
    if report.moved_aside:
        print(f"  the previous index is kept at {report.moved_aside}")
    return EXIT_OK


# ---------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hstore_bench import TIERS, BenchConfig, format_report, run_bench, write_csv

    tiers = args.tiers if args.tiers is not None else [] if args.remote else list(TIERS)
    if not tiers:
        return _bench_remote(args)
    if args.root is None:
        return _usage_error(args, f"ROOT is needed to measure {','.join(tiers)}")
    try:
        cfg = BenchConfig(root=args.root, sizes=args.sizes, total=args.total, tiers=tiers, engine=args.engine,
                          queue_depth=args.queue_depth, repeat=args.repeat, batch_bytes=args.batch,
                          torch_threads=args.torch_threads)
    except ValueError as e:
        return _usage_error(args, str(e))
    report = _Bar.run(args, lambda bar: run_bench(cfg, progress=bar), desc="bench", unit="step")
    if args.json:
        doc = {"host": report.host, "engine": report.engine, "direct_io": report.direct_io,
               "seconds": round(report.seconds, 3),
               "config": {**asdict(cfg), "root": str(cfg.root)},
               "rows": [r.as_dict() for r in report.rows],
               "targets": [asdict(t) for t in report.targets]}
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(report))
    if args.csv:
        if args.csv == "-":
            write_csv(report, sys.stdout)
        else:
            with open(args.csv, "w", newline="") as f:
                write_csv(report, f)
    return _bench_remote(args) if args.remote else EXIT_OK


def _bench_remote(args: argparse.Namespace) -> int:
    from hstore.tiers.remote.config import redact_url
    from hstore_bench.remote import RemoteBenchConfig, format_rows, run_remote_bench

    try:
        cfg = RemoteBenchConfig(url=args.remote, sizes=args.sizes, total=args.total, repeat=args.repeat,
                                batch_bytes=args.batch)
    except ValueError as e:
        return _usage_error(args, str(e))
    rows = _Bar.run(args, lambda bar: run_remote_bench(cfg, progress=bar), desc="bench remote", unit="step")
    if args.json:
        print(json.dumps({"remote": redact_url(cfg.url), "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(format_rows(redact_url(cfg.url), rows))
    return EXIT_OK


# ---------------------------------------------------------------------------- main
def _usage_error(args: argparse.Namespace, message: str) -> int:
    print(f"hstore {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hstore` script; returns the exit status (also for --help and usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed what it had to
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
    from hstore.ondisk import NotAStoreError

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hstore: %(levelname)s: %(name)s: %(message)s"))
    log = logging.getLogger("hstore")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except NotAStoreError as e:
        return _usage_error(args, str(e))
    except StoreLockedError as e:
        print(f"hstore {args.command}: error: {e}; close it first (stats works while it is open)", file=sys.stderr)
        return EXIT_PROBLEMS
    except (HStoreError, OSError) as e:
        print(f"hstore {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        print(f"hstore {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
