"""Device communicators: chosen from the platform, one constructor, the switch, the Pallas path on CPU.

``PallasCommunicator`` (vLLM's GPU and TPU communicators) plans for the platform it was built
for and lowers for the devices it runs on: built for ``"gpu"`` or ``"tpu"`` on the simulated CPU
devices here, it runs the TPU-form kernels in Pallas's interpret mode, so these tests drive the
custom all-reduce path through the communicator without an accelerator.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import groups, init, per_device, random_array
from jax.sharding import PartitionSpec as P

import spmd
from kernels import custom_all_reduce as kernels_car
from spmd.communicators import (
    PallasCommunicator,
    XlaCommunicator,
    allreduce_plan,
    communicator_class_for,
    make_device_communicator,
    tuning,
)

# gpu / tpu rows at world size 2: one-shot up to 1 KiB, two-shot up to 4 KiB, psum above.
ROW = {"max_bytes": 4096, "one_shot_max_bytes": 1024, "source": "test", "algorithms": ["one_shot", "two_shot"]}
TABLE = {"platforms": {p: {"2": ROW} for p in ("gpu", "tpu")}}  # a GPU row picks two-shot only if it lists it


# Parameter ids never say "gpu" alone: conftest skips tests whose keywords include "gpu".
PLANNED_FOR = pytest.mark.parametrize("platform", ["gpu", "tpu"], ids=["planned-for-gpu", "planned-for-tpu"])


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """The communicators' default tuning table replaced by ``TABLE``."""
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    return path


@pytest.fixture
def kernel_calls(monkeypatch):
    """A spy on the kernel entry the communicators call: one ``(algorithm, lowering)`` per launch."""
    calls = []
    real = allreduce_plan.all_reduce_kernel

    def spy(x, axis_name, **kwargs):
        calls.append((kwargs["algorithm"], kwargs["lowering"]))
        return real(x, axis_name, **kwargs)

    monkeypatch.setattr(allreduce_plan, "all_reduce_kernel", spy)
    return calls


def test_communicator_is_chosen_from_the_platform():
    init((2, 1, 1, 4))
    for getter in (spmd.get_tp_group, spmd.get_world_group, spmd.get_ep_group):
        assert type(getter().device_communicator) is XlaCommunicator
    for platform in ("gpu", "cuda", "tpu", "GPU"):
        assert communicator_class_for(platform) is PallasCommunicator
    for platform in ("cpu", "rocm", "METAL"):
        assert communicator_class_for(platform) is XlaCommunicator
    # vLLM's names stay importable.
    assert spmd.DeviceCommunicatorBase is XlaCommunicator and spmd.CpuCommunicator is XlaCommunicator
    assert spmd.GpuCommunicator is PallasCommunicator and spmd.TpuCommunicator is PallasCommunicator


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu", "rocm", "metal"], ids=lambda p: f"on-{p}")
@pytest.mark.parametrize("disable", [False, True])
def test_every_communicator_has_one_constructor_and_records_the_switch(platform, disable):
    comm = make_device_communicator(("ep", "tp"), 4, platform=platform, disable_custom_all_reduce=disable)
    assert isinstance(comm, communicator_class_for(platform))
    assert comm.disable_custom_all_reduce is disable
    assert (comm.axis_name, comm.world_size, comm.platform, comm.unique_name) == (("ep", "tp"), 4, platform, "ep_tp")
    same = type(comm)(("ep", "tp"), 4, platform=platform, unique_name="x", disable_custom_all_reduce=disable)
    assert same.disable_custom_all_reduce is disable and same.unique_name == "x"
    assert f"disable_custom_all_reduce={disable}" in repr(comm)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_world_size_must_be_a_positive_int(bad):
    for cls in (XlaCommunicator, PallasCommunicator):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: expected a positive int world_size, got {bad!r}"):
            cls("tp", bad, platform="cpu")


@pytest.mark.parametrize("disable", [True, False])
def test_initialize_model_parallel_passes_disable_custom_all_reduce(disable):
    spmd.initialize_model_parallel(tensor_model_parallel_size=2, disable_custom_all_reduce=disable)
    for getter in (spmd.get_tp_group, spmd.get_world_group, spmd.get_dp_group, spmd.get_ep_group):
        assert getter().device_communicator.disable_custom_all_reduce is disable


def test_initialize_model_parallel_keeps_custom_all_reduce_on_by_default():
    spmd.initialize_model_parallel(tensor_model_parallel_size=2)
    assert spmd.get_tp_group().device_communicator.disable_custom_all_reduce is False


@pytest.mark.parametrize("cls", [PallasCommunicator, XlaCommunicator])
@pytest.mark.parametrize("disable", [False, True])
def test_every_communicator_lowers_correctly(cls, disable, rng):
    """Each communicator gives the reference results (traced here on CPU devices)."""
    init((2, 1, 1, 4))
    comm = cls("tp", 4, platform="cpu", disable_custom_all_reduce=disable)
    x = random_array(rng, (8, 8, 4), np.float32)
    ar, ag, rs, a2a = per_device(
        lambda v: (
            comm.all_reduce(v),
            comm.all_gather(v, 0),
            comm.reduce_scatter(v, 0),
            comm.all_to_all(v, 0, 1),
        ),
        x,
    )
    for g in groups((2, 1, 1, 4), ("tp",)):
        for rank, r in enumerate(g):
            np.testing.assert_allclose(ar[r], x[g].sum(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(ag[r], np.concatenate(list(x[g]), 0))
            np.testing.assert_allclose(rs[r], np.split(x[g].sum(0), 4, 0)[rank], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(a2a[r], np.concatenate([np.split(x[s], 4, 0)[rank] for s in g], 1))


def test_seam_prefers_custom_all_reduce(rng):
    """Whatever ``custom_all_reduce`` returns is used by all_reduce, unless the switch turns it off."""

    class Doubling(PallasCommunicator):
        def custom_all_reduce(self, input_):
            return 2 * spmd.all_reduce(input_, self.axis_name)

    init((1, 1, 1, 8))
    x = random_array(rng, (8, 4), np.float32)
    on = per_device(Doubling("tp", 8, platform="gpu").all_reduce, x)
    off = per_device(Doubling("tp", 8, platform="gpu", disable_custom_all_reduce=True).all_reduce, x)
    np.testing.assert_allclose(on[0], 2 * x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(off[0], x.sum(0), rtol=1e-5, atol=1e-5)


def _all_reduce(comm, x):
    """``comm.all_reduce`` on every device (``check_vma=False``, as the kernels need); numpy out, jaxpr text."""
    spec = P(spmd.MESH_AXES)
    body = lambda v: comm.all_reduce(v[0])[None]
    f = spmd.shard_map(body, in_specs=spec, out_specs=spec, check_vma=False)
    return np.asarray(jax.jit(f)(x)), str(jax.make_jaxpr(f)(x))


@PLANNED_FOR
@pytest.mark.parametrize(
    "numel,algorithm",
    [(64, "one_shot"), (256, "one_shot"), (640, "two_shot"), (1024, "two_shot")],
    ids=["256B", "1KiB", "2.5KiB", "4KiB"],
)
def test_eligible_all_reduce_runs_the_pallas_kernel(platform, numel, algorithm, tuned, kernel_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = make_device_communicator("tp", 2, platform=platform)
    x = random_array(rng, (8, numel), np.float32)
    out, jaxpr = _all_reduce(comm, x)
    assert jaxpr.count("pallas_call") == 1 and "psum" not in jaxpr
    assert kernel_calls and set(kernel_calls) == {(algorithm, "tpu")}  # the TPU form, interpreted on CPU
    for g in range(4):
        want = x[2 * g].astype(np.float64) + x[2 * g + 1]
        np.testing.assert_allclose(out[2 * g], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[2 * g], out[2 * g + 1])  # the kernel's bits on every rank


@PLANNED_FOR
def test_a_pytree_takes_the_kernel_per_dtype(platform, tuned, kernel_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = make_device_communicator("tp", 2, platform=platform)
    tree = {"a": random_array(rng, (8, 40), np.float32), "b": random_array(rng, (8, 24), np.float32)}
    spec = P(spmd.MESH_AXES)
    f = jax.jit(
        spmd.shard_map(
            lambda t: jax.tree.map(lambda v: v[None], comm.all_reduce(jax.tree.map(lambda v: v[0], t))),
            in_specs=spec,
            out_specs=spec,
            check_vma=False,
        )
    )
    out = jax.tree.map(np.asarray, f(tree))
    assert kernel_calls == [("one_shot", "tpu")]  # 64 f32 leaves packed: 256 B, one launch
    for k, v in tree.items():
        np.testing.assert_allclose(out[k][::2], v[::2] + v[1::2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "platform,numel,disable,why",
    [
        ("gpu", 2048, False, "8 KiB is over the table's 4 KiB"),
        ("tpu", 2048, False, "8 KiB is over the table's 4 KiB"),
        ("gpu", 256, True, "the switch is off"),
        ("tpu", 256, True, "the switch is off"),
        ("cpu", 256, False, "no CPU row in the table"),
        ("gpu", 3, False, "12 B is not a multiple of 16"),
    ],
    ids=["over-max-gpu-plan", "over-max-tpu-plan", "off-gpu-plan", "off-tpu-plan", "cpu-plan", "unaligned"],
)
def test_ineligible_or_disabled_all_reduce_uses_psum(platform, numel, disable, why, tuned, kernel_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = PallasCommunicator("tp", 2, platform=platform, disable_custom_all_reduce=disable)
    x = random_array(rng, (8, numel), np.float32)
    out, jaxpr = _all_reduce(comm, x)
    assert "pallas_call" not in jaxpr and "psum" in jaxpr, why
    assert kernel_calls == []
    np.testing.assert_allclose(out[::2], x[::2] + x[1::2], rtol=1e-6, atol=1e-6)


@PLANNED_FOR
def test_check_vma_keeps_eligible_input_on_psum(platform, tuned, kernel_calls, rng):
    """Under ``check_vma=True`` the kernels cannot carry the varying-axes types: psum, typed invariant."""
    spmd.initialize_model_parallel(2)
    comm = PallasCommunicator("tp", 2, platform=platform)
    x = random_array(rng, (4, 128), np.float32)
    f = spmd.shard_map(comm.all_reduce, in_specs=P(None, "tp"), out_specs=P())  # check_vma on (the default)
    assert "pallas_call" not in str(jax.make_jaxpr(f)(x)) and kernel_calls == []
    np.testing.assert_allclose(jax.jit(f)(x), x[:, :64] + x[:, 64:], rtol=1e-6, atol=1e-6)


def test_custom_all_reduce_declines_without_a_measured_entry(tmp_path, monkeypatch, rng):
    """No row for this world size (or a row that says 0 bytes) means the seam returns None."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"platforms": {"gpu": {"4": {"max_bytes": 0, "one_shot_max_bytes": 0}}}}))
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    seen = []
    for world in (4, 8):
        spmd.initialize_model_parallel(world)
        comm = PallasCommunicator("tp", world, platform="gpu")
        x = random_array(rng, (8, 64), np.float32)
        spmd.shard_map(lambda v, c=comm: seen.append(c.custom_all_reduce(v)) or v, in_specs=P(), out_specs=P())(x[0])
        spmd.destroy_model_parallel()
    assert seen == [None, None]


def test_kernel_module_is_the_one_dispatch_calls():
    """The spy above patches the function that really launches the kernels."""
    assert allreduce_plan.all_reduce_kernel is kernels_car.all_reduce_kernel
