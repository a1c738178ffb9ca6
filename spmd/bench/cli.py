"""``spmd-bench``: the front door to every benchmark, one subcommand per feature.

    spmd-bench collectives -b 8 -e 1G -f 2 --plot busbw.png   # nccl-tests' table, NCCL beside
    spmd-bench custom-all-reduce --world-sizes 2,4
    spmd-bench decode --tp 1,2 --batches 1,32
    spmd-bench <subcommand> --help                             # its options, defaults and units

Each subcommand runs the benchmark module's ``main`` with the remaining arguments, so
``python -m spmd.bench.custom_all_reduce ...`` and ``spmd-bench custom-all-reduce ...`` are the same
run (the JSON records the module's command). Without a subcommand (``spmd-bench --platform gpu``,
as before the front door) it runs ``collectives``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> (module whose main(argv) runs it, one line of help). Modules are imported by name
# when chosen: the front door sits above the models package without importing it otherwise.
SUBCOMMANDS = {
    "collectives": ("spmd.bench.collectives", "every TP collective, nccl-tests' algbw/busbw table, NCCL beside"),
    "custom-all-reduce": ("spmd.bench.custom_all_reduce", "the Pallas all-reduce kernels against psum"),
    "fused-norm": ("spmd.bench.fused_norm", "all-reduce + residual + RMSNorm in one kernel (GPU)"),
    "expert-parallel": ("spmd.bench.expert_parallel", "MoE dispatch/combine managers"),
    "kv": ("spmd.bench.kv_transfer", "KV-cache pipes over TCP"),
    "kv-device-put": ("spmd.bench.kv_device_put", "KV pipe on jax.device_put (run under spmd-launch)"),
    "kv-ipc": ("spmd.bench.kv_ipc", "KV pipe on CUDA IPC / shared memory"),
    "host-broadcast": ("spmd.bench.host_broadcast", "host-level broadcast between processes"),
    "decode": ("models.bench_decode", "decode step and prefill of a Llama (TP sizes, psum vs custom)"),
    "gemv": ("models.bench_gemv", "the decode GEMV kernels against XLA's product"),
    "docs-tables": ("spmd.bench.docs_tables", "render docs/results/*.json into the tables in docs/ (--check)"),
}


def usage() -> str:
    """The front door's help: every subcommand with its one line."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return (
        "usage: spmd-bench <subcommand> [options]   (spmd-bench <subcommand> --help for its options)\n\n"
        "subcommands:\n" + "\n".join(lines) + "\n\nWithout a subcommand, spmd-bench runs 'collectives' with the "
        "options given.\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand's ``main``; exit status 2 with the list of subcommands for an unknown one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args or args[0].startswith("-"):
        name, rest = "collectives", args
    else:
        name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"spmd-bench: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}.\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
