"""Parallel state: config, mesh layout, groups, lifecycle, communicators."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import MESH_IDS, MESH_SHAPES, groups, init, per_device, random_array

import spmd
from spmd.communicators import communicator_class_for


def test_config_resolves_data_parallel_size():
    cfg = spmd.ParallelConfig(tensor_parallel_size=2, expert_parallel_size=2).resolve(8)
    assert cfg.data_parallel_size == 2 and cfg.mesh_shape == (2, 1, 2, 2)
    assert spmd.ParallelConfig(4, 1, 2, 1).resolve(8).mesh_shape == (2, 1, 1, 4)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
def test_mesh_layout_and_groups(shape):
    mesh = init(shape)
    assert mesh.axis_names == ("dp", "pp", "ep", "tp")
    assert tuple(mesh.devices.shape) == shape
    ids = [d.id for d in mesh.devices.flat]
    assert ids == sorted(ids)  # row-major, "tp" innermost: TP groups are consecutive devices
    assert spmd.get_mesh() is mesh
    cfg = spmd.get_parallel_config()
    assert cfg.mesh_shape == shape
    for name, getter, axes in [
        ("tp", spmd.get_tp_group, ("tp",)),
        ("ep", spmd.get_ep_group, ("ep",)),
        ("pp", spmd.get_pp_group, ("pp",)),
        ("dp", spmd.get_dp_group, ("dp",)),
        ("world", spmd.get_world_group, spmd.MESH_AXES),
    ]:
        g = getter()
        assert g.unique_name == name
        assert g.world_size == int(np.prod([shape["dp pp ep tp".split().index(a)] for a in axes]))
        assert g.ranks == tuple(range(g.world_size))
        assert (g.first_rank, g.last_rank) == (0, g.world_size - 1)
        expected = [tuple(int(ids[i]) for i in row) for row in groups(shape, axes)]
        assert list(g.device_groups) == expected
    assert spmd.get_tensor_model_parallel_world_size() == shape[3]


def test_world_group_ranks_inside_shard_map():
    init((2, 1, 2, 2))
    world = spmd.get_world_group()
    x = np.zeros((8, 1), np.int32)
    out = per_device(lambda v: v + world.rank_in_group, x)
    np.testing.assert_array_equal(out[:, 0], np.arange(8))
    out = per_device(lambda v: v + spmd.get_tensor_model_parallel_rank(), x)
    np.testing.assert_array_equal(out[:, 0], np.arange(8) % 2)


def test_lifecycle():
    assert not spmd.model_parallel_is_initialized()
    mesh = spmd.initialize_model_parallel(4)
    assert spmd.model_parallel_is_initialized()
    assert spmd.initialize_model_parallel(4) is mesh  # same config: harmless
    assert spmd.ensure_model_parallel_initialized(4) is mesh
    spmd.destroy_model_parallel()
    assert not spmd.model_parallel_is_initialized()
    mesh2 = spmd.ensure_model_parallel_initialized(2)
    assert spmd.get_parallel_config().tensor_parallel_size == 2 and mesh2.shape["dp"] == 4


def test_initialize_on_a_subset_of_devices(rng):
    devs = jax.devices()[:4]
    mesh = spmd.initialize_model_parallel(2, devices=devs)
    assert mesh.devices.size == 4 and spmd.get_dp_group().world_size == 2
    assert spmd.get_tp_group().device_groups == ((0, 1), (2, 3))


def test_communicator_is_chosen_from_the_platform():
    init((2, 1, 1, 4))
    for getter in (spmd.get_tp_group, spmd.get_world_group, spmd.get_ep_group):
        assert type(getter().device_communicator) is spmd.CpuCommunicator
    assert communicator_class_for("gpu") is spmd.GpuCommunicator
    assert communicator_class_for("cuda") is spmd.GpuCommunicator
    assert communicator_class_for("tpu") is spmd.TpuCommunicator
    assert communicator_class_for("METAL") is spmd.DeviceCommunicatorBase


@pytest.mark.parametrize("cls", [spmd.GpuCommunicator, spmd.TpuCommunicator, spmd.DeviceCommunicatorBase])
@pytest.mark.parametrize("disable", [False, True])
def test_every_communicator_lowers_correctly(cls, disable, rng):
    """Each platform's communicator gives the reference results (traced here on CPU devices)."""
    init((2, 1, 1, 4))
    kwargs = {"disable_custom_all_reduce": disable} if cls is spmd.GpuCommunicator else {}
    comm = cls("tp", 4, platform="cpu", **kwargs)
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


def test_gpu_communicator_seam_prefers_custom_all_reduce(rng):
    """A kernel registered at the seam is used by all_reduce unless the switch turns it off."""

    class Doubling(spmd.GpuCommunicator):
        def custom_all_reduce(self, input_):
            return 2 * spmd.all_reduce(input_, self.axis_name)

    init((1, 1, 1, 8))
    x = random_array(rng, (8, 4), np.float32)
    on = per_device(Doubling("tp", 8, platform="gpu").all_reduce, x)
    off = per_device(Doubling("tp", 8, platform="gpu", disable_custom_all_reduce=True).all_reduce, x)
    np.testing.assert_allclose(on[0], 2 * x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(off[0], x.sum(0), rtol=1e-5, atol=1e-5)


def test_initialize_passes_the_switch_to_gpu_communicators():
    comm = spmd.make_device_communicator("tp", 4, platform="gpu", disable_custom_all_reduce=True)
    assert isinstance(comm, spmd.GpuCommunicator) and comm.disable_custom_all_reduce


def test_barrier_single_process(rng):
    init((2, 1, 1, 4))
    x = jax.device_put(random_array(rng, (8, 8), np.float32))
    _ = x * 2
    spmd.get_world_group().barrier()
    spmd.get_tp_group().barrier()
