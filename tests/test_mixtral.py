"""Mixtral end to end on TP x EP meshes: logits and greedy tokens against the numpy reference
(router softmax in float64, top-k, renormalised; SwiGLU experts), both expert layouts of a checkpoint."""

from __future__ import annotations

import np_reference
import numpy as np
import pytest
from conftest import SESSION_SEED
from jax.sharding import PartitionSpec as P
from model_fixtures import checkpoint_without_near_ties, init, mixtral_config

import models
from models.loading import fuse_experts
from models.mixtral import default_moe_manager

CONFIG = mixtral_config()
MESHES = [(1, 1), (2, 2), (2, 4), (4, 2)]  # (tp, ep)
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt():
    rng = np.random.default_rng([SESSION_SEED, 12])
    weights, prompts, greedy = checkpoint_without_near_ties(CONFIG, rng, (7, 3), NEW_TOKENS)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 11))
    ref = np.stack([np_reference.forward(CONFIG.to_hf(), weights, row) for row in ids])
    return {"weights": weights, "ids": ids, "ref": ref, "prompts": prompts, "greedy": greedy}


@pytest.mark.parametrize("mesh", MESHES, ids=[f"tp{t}ep{e}" for t, e in MESHES])
def test_score_and_greedy_tokens_match_reference(mesh, ckpt):
    tp, ep = mesh
    init(tp, ep)
    model = models.load_state_dict(CONFIG, ckpt["weights"])
    np.testing.assert_allclose(np.asarray(models.score(model, ckpt["ids"])), ckpt["ref"], rtol=0, atol=1e-3)
    out = models.generate(model, ckpt["prompts"], NEW_TOKENS)
    assert out == [want for want, _ in ckpt["greedy"]]


def test_fused_expert_layout_loads_the_same(ckpt):
    init(2, 2, dp=2)
    model = models.load_state_dict(CONFIG, fuse_experts(CONFIG, ckpt["weights"]))
    np.testing.assert_allclose(np.asarray(models.score(model, ckpt["ids"])), ckpt["ref"], rtol=0, atol=1e-3)
    moe = model.module.model.layers[0].mlp
    assert moe.w_gate[...].sharding.spec == P("ep", None, "tp")
    assert moe.w_gate[...].addressable_shards[0].data.shape == (2, 64, 32)  # 4 experts / ep 2, ffn 64 / tp 2


def test_experts_must_split_over_ep(ckpt):
    init(1, 8)
    with pytest.raises(
        ValueError, match=r"num_local_experts=4 does not divide by ep=8.*EP sizes that work: \[1, 2, 4\]"
    ):
        models.load_state_dict(CONFIG, ckpt["weights"])


def test_moe_manager_is_the_measured_fastest():
    assert default_moe_manager("gpu") == "naive"  # docs/expert_parallel.md
