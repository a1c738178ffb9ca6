"""Multi-process demo: TP collectives across processes and the seed's broadcast_tensor_dict.

    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 2 docs/examples/multi_process.py
    spmd-launch --nproc-per-node 2 docs/examples/multi_process.py          # one GPU per process

Every process checks its own result (an assertion: a wrong sum fails its rank); only process 0 prints,
a table of every process's error gathered with spmd.host.all_gather_object.
"""

import spmd

spmd.init_distributed_environment()  # first, before any JAX computation

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

pid, nproc, ndev = jax.process_index(), jax.process_count(), jax.device_count()
mesh = spmd.initialize_model_parallel(tensor_model_parallel_size=ndev)  # one TP group over every process

# The seed's example 2: process 0 loads a config and weights, the others pass None.
if pid == 0:
    config = {
        "max_seq_len": 4096,
        "hidden_size": 4096,
        "model_weights": {"layer1.weight": jnp.ones((8, 4), jnp.bfloat16), "layer1.bias": np.arange(4.0)},
    }
else:
    config = None
config = spmd.broadcast_tensor_dict(config, src=0)
assert config["max_seq_len"] == 4096 and config["model_weights"]["layer1.weight"].dtype == jnp.bfloat16

# Row-parallel linear across processes: each device holds a slice of x and of W.
rng = np.random.default_rng(spmd.host.broadcast_object(1234 if pid == 0 else None))
x = rng.standard_normal((4, 8 * ndev)).astype(np.float32)
w = rng.standard_normal((8 * ndev, 16)).astype(np.float32)
put = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])
f = jax.jit(
    spmd.shard_map(
        lambda xs, ws: spmd.tensor_model_parallel_all_reduce(jnp.dot(xs, ws, precision="highest")),
        in_specs=(P(None, "tp"), P("tp", None)),
        out_specs=P(),
    )
)
y = np.asarray(multihost_utils.process_allgather(f(put(x, P(None, "tp")), put(w, P("tp", None))), tiled=True))
err = float(np.max(np.abs(y - x @ w)))
results = spmd.host.all_gather_object({"process": pid, "devices": jax.local_device_count(), "max_err": err})
spmd.host.barrier()
if pid == 0:
    print(f"{'process':>7} {'devices':>7} {'row-parallel max err':>21}")
    for r in results:
        print(f"{r['process']:>7} {r['devices']:>7} {r['max_err']:>21.2e}")
    w1 = config["model_weights"]["layer1.weight"]
    print(f"broadcast_tensor_dict ok: max_seq_len={config['max_seq_len']}, layer1.weight {w1.dtype}{list(w1.shape)}")
assert err < 1e-3
