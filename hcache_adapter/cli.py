"""`hcache` command line: the demo (main job), the GPU benchmark, and profiling."""
from __future__ import annotations

import sys

USAGE = """usage: hcache [-h] [--version] {demo,bench,profile} ...

HCache state restoration for HuggingFace models over the hstore tiered store.

commands:
  demo      store, evict and restore real context state on a CPU and print what it measured
  bench     the restore benchmark (recompute / kv / hcache / auto / hf_offloaded), made for a GPU
  profile   measure and print the scheduler's hardware profile for a model shape

Run `hcache COMMAND --help` for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(version("hstore-hcache"))
        except PackageNotFoundError:
            print("unknown (not installed)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from hcache_adapter.demo import main as run
    elif command == "bench":
        from hcache_adapter.bench import main as run
    elif command == "profile":
        from hcache_adapter.bench.profile import main as run
    else:
        print(f"hcache: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
