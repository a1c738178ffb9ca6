"""Benchmark: MoE dispatch + combine for every all-to-all manager, on all local devices.

    python -m spmd.bench.expert_parallel --json ep.json                # every local GPU as EP ranks
    python -m spmd.bench.expert_parallel --platform cpu --tokens 1,16 --hidden 256   # smoke test

Per configuration (tokens per rank, hidden, top-k, experts) each manager routes bf16 tokens to
identity experts and back (dispatch + combine, no expert math), checked once against the naive
manager, then timed as ``--iters`` chained round trips in one jitted ``lax.fori_loop``, best of
``--repeats``. "wire MB" is what one rank sends per round trip; GB/s is that over the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

CONFIGS = "2x8,8x64"  # top-k x experts


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m spmd.bench.expert_parallel")
    p.add_argument("--platform", default="", help="cpu for simulated devices (default: the default backend)")
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--tokens", default="1,128,4096", help="tokens per EP rank")
    p.add_argument("--hidden", default="4096,7168")
    p.add_argument("--configs", default=CONFIGS, help="top-k x experts pairs, e.g. 2x8,8x64")
    p.add_argument("--managers", default="naive,capacity,ragged", help="also: ragged-dense (no ragged collective)")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="bench_expert_parallel.json")
    a = p.parse_args(argv)
    a.tokens = [int(t) for t in a.tokens.split(",")]
    a.hidden = [int(h) for h in a.hidden.split(",")]
    a.configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    a.managers = a.managers.split(",")
    return a


def _wire_bytes(name: str, ep: int, t: int, h: int, k: int, e: int, cap: int) -> int:
    """Bytes one rank sends per dispatch + combine (bf16 tokens)."""
    frac = (ep - 1) / ep
    if name == "naive":
        return int((ep - 1) * t * h * 2 + frac * ep * t * h * 4)  # all-gather bf16 + reduce-scatter f32
    if name == "capacity":
        return int(2 * frac * e * cap * h * 2)
    if name == "ragged-dense":
        return int(2 * frac * ep * t * k * h * 2)  # padded to every slot per destination
    return int(2 * frac * t * k * h * 2)  # ragged: the routed rows, both ways (uniform routing)


def main(argv=None) -> int:
    a = _args(argv)
    import jax

    if a.platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import spmd
    from spmd.bench.timing import best_seconds
    from spmd.expert_parallel import get_all2all_manager

    devices = jax.devices()
    ep = len(devices)
    spmd.initialize_model_parallel(1, 1, 1, ep)
    mesh = spmd.get_mesh()
    spec = P("ep")
    kind = devices[0].device_kind
    print(
        f"{ep} x {kind}, jax {jax.__version__}, EP={ep}, bf16, identity experts, "
        f"{a.iters} chained round trips, best of {a.repeats}",
        flush=True,
    )
    header = (
        f"{'tokens':>6} {'hidden':>6} {'k':>2} {'E':>3} {'manager':>9} {'us':>9} {'wire MB':>8} {'GB/s':>7} "
        f"{'dropped':>7}  check"
    )
    print(header, flush=True)
    rng = np.random.default_rng()
    rows = []
    for t in a.tokens:
        for h in a.hidden:
            for k, e in a.configs:
                x = rng.standard_normal((ep * t, h)).astype(np.float32).astype(jnp.bfloat16)
                ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(ep * t)]).astype(np.int32)
                w = rng.random((ep * t, k)).astype(np.float32)
                w /= w.sum(1, keepdims=True)
                xs, ws, idss = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, w, ids))
                reference = None
                for name in a.managers:
                    kwargs = {"capacity_factor": a.capacity_factor} if name == "capacity" else {}
                    if name == "ragged-dense":  # the ragged manager over the padded all_to_all emulation
                        kwargs = {"use_ragged_collective": False}
                    manager = get_all2all_manager(name.split("-")[0], e, tp_axis=None, **kwargs)

                    def round_trip(x, w, ids, manager=manager):
                        inputs, state = manager.dispatch(x, w, ids)
                        return manager.combine(inputs, state), state.num_dropped

                    def one(x, w, ids, rt=round_trip):
                        y, dropped = rt(x, w, ids)
                        return y, dropped[None]

                    once = jax.jit(spmd.shard_map(one, in_specs=(spec,) * 3, out_specs=(spec, spec), check_vma=False))
                    try:
                        y, dropped = once(xs, ws, idss)
                        y = np.asarray(y).astype(np.float32)
                        dropped = int(np.asarray(dropped).sum())
                        if reference is None and name == "naive":
                            reference = y
                        ok = reference is None or dropped > 0 or bool(np.allclose(y, reference, rtol=2e-2, atol=2e-2))

                        def loop(x, w, ids, rt=round_trip):
                            return jax.lax.fori_loop(0, a.iters, lambda i, c: rt(c, w, ids)[0], x)

                        looped = jax.jit(spmd.shard_map(loop, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
                        best = best_seconds(looped, xs, ws, idss, repeats=a.repeats)
                        us = best / a.iters * 1e6
                    except Exception as exc:  # one failing manager must not hide the others
                        print(
                            f"{t:>6} {h:>6} {k:>2} {e:>3} {name:>9} ERROR {type(exc).__name__}: {str(exc)[:300]}",
                            flush=True,
                        )
                        rows.append(
                            {"tokens": t, "hidden": h, "k": k, "experts": e, "manager": name, "error": str(exc)[:500]}
                        )
                        continue
                    cap = manager.capacity(t, k) if name == "capacity" else 0
                    wire = _wire_bytes(name, ep, t, h, k, e, cap)
                    row = {
                        "tokens": t,
                        "hidden": h,
                        "k": k,
                        "experts": e,
                        "manager": name,
                        "us": us,
                        "wire_bytes": wire,
                        "GBps": wire / us / 1e3,
                        "dropped": dropped,
                        "ok": ok,
                    }
                    rows.append(row)
                    print(
                        f"{t:>6} {h:>6} {k:>2} {e:>3} {name:>9} {us:>9.1f} {wire / 1e6:>8.2f} {row['GBps']:>7.1f} "
                        f"{dropped:>7}  {'ok' if ok else 'WRONG'}",
                        flush=True,
                    )
    meta = {
        "device_kind": kind,
        "ep": ep,
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m spmd.bench.expert_parallel " + " ".join(argv or sys.argv[1:]),
    }
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {a.json}", flush=True)
    return 0 if all(r.get("ok", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
