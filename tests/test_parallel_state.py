"""Parallel state: config, mesh layout, groups, lifecycle, communicators."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import MESH_IDS, MESH_SHAPES, groups, init, per_device, random_array

import spmd


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
        expected = [tuple(int(ids[i]) for i in row) for row in groups(shape, axes)]
        assert list(g.device_groups) == expected
    assert spmd.get_tensor_model_parallel_world_size() == shape[3]


def _members(shape, axes, i):
    """Global ranks (mesh positions) of device ``i``'s group along ``axes``, by brute force."""
    coords = np.array(np.unravel_index(np.arange(int(np.prod(shape))), shape)).T
    keep = [k for k, a in enumerate(("dp", "pp", "ep", "tp")) if a not in axes]
    return [j for j in range(len(coords)) if (coords[j][keep] == coords[i][keep]).all()]


@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (1, 2, 2, 2), (4, 1, 1, 2)], ids=str)
def test_global_ranks_follow_vllm(shape):
    """``ranks`` / ``first_rank`` / ``last_rank`` are global ranks (vLLM's meaning), per device."""
    init(shape)
    n = int(np.prod(shape))
    for getter, axes in [
        (spmd.get_tp_group, ("tp",)),
        (spmd.get_ep_group, ("ep",)),
        (spmd.get_pp_group, ("pp",)),
        (spmd.get_dp_group, ("dp",)),
        (spmd.get_world_group, spmd.MESH_AXES),
    ]:
        g = getter()
        x = np.zeros((n, 1), np.int32)
        ranks, first, last = per_device(lambda v, g=g: (g.ranks, g.first_rank + v[0], g.last_rank + v[0]), x)
        for i in range(n):
            members = _members(shape, axes, i)
            np.testing.assert_array_equal(ranks[i], members, err_msg=f"{g.unique_name} device {i}")
            assert (first[i], last[i]) == (members[0], members[-1])
    with pytest.raises(spmd.UnboundAxisError, match=r"tp\.ranks: found an unbound axis name"):
        _ = spmd.get_tp_group().ranks


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


def test_barrier_single_process_waits_for_queued_work(rng, monkeypatch):
    """``barrier`` returns only after this process's queued device work is done."""
    init((2, 1, 1, 4))
    from spmd import host

    waited = []
    real = jax.block_until_ready
    monkeypatch.setattr(host.jax, "block_until_ready", lambda xs: waited.append(len(xs)) or real(xs))
    x = jax.device_put(random_array(rng, (8, 8), np.float32))
    y = jax.jit(lambda v: v @ v.T)(x)
    spmd.get_world_group().barrier()
    spmd.get_tp_group().barrier()
    assert len(waited) == 2 and all(n >= 2 for n in waited)  # x and y were among the arrays waited on
    assert y.is_ready()
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x, np.float64) @ np.asarray(x, np.float64).T, rtol=1e-4, atol=1e-4
    )
