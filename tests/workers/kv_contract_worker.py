"""Worker of ``tests/test_kv_contract.py``: the KV-pipe contract over :class:`DevicePutKVPipe`, one half per process.

    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 4 tests/workers/kv_contract_worker.py CASES SEED

``CASES`` comma-separated (``tests/kv_contract.py``'s names). Process 0 sends from its first 2
devices, process 1 receives on its 4; each case on a pipe of its own name, so one failing case
leaves the others in step. Prints ``PASS <case> send|recv`` or ``FAIL <case> ...`` per case and
exits non-zero when any case failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: kv_contract


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", help="comma-separated case names of tests/kv_contract.py")
    parser.add_argument("seed", type=int, help="the data seed both halves draw from")
    args = parser.parse_args(argv)

    from spmd.kv_transfer import DevicePutKVPipe

    DevicePutKVPipe.enable_transfers(timeout_s=60)
    import jax

    import spmd
    from spmd import compat

    spmd.init_distributed_environment()
    import kv_contract

    me = jax.process_index()
    side = [[d for d in jax.devices() if d.process_index == i] for i in (0, 1)]
    role = "send" if me == 0 else "recv"
    failed = 0
    for i, name in enumerate(args.cases.split(",")):
        timeout_s = kv_contract.TIMEOUT_S.get(name, kv_contract.DEFAULT_TIMEOUT_S)
        pipe = DevicePutKVPipe(side[0][:2], side[1][:4], timeout_s=timeout_s, name=f"contract-{name}")

        def sync(label: str, name=name) -> None:
            compat.distributed_client().wait_at_barrier(f"kv-contract/{name}/{label}", 60_000)

        try:
            kv_contract.CASES[name](kv_contract.Side(pipe, kv_contract.CAPS["devput"], args.seed + i, sync), role)
            print(f"PASS {name} {role}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name} {role}\n{traceback.format_exc()}", flush=True)
        finally:
            pipe.close()
        compat.distributed_client().wait_at_barrier(f"kv-contract/{name}/done", 120_000)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
