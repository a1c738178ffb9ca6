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
# (tp, ep); the fast lane runs EP 2 and EP 4 (one expert per rank), the full suite adds one device and TP 4
MESHES = [pytest.param(1, 1, marks=pytest.mark.slow), (2, 2), (2, 4), pytest.param(4, 2, marks=pytest.mark.slow)]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt():
    rng = np.random.default_rng([SESSION_SEED, 12])
    weights, prompts, greedy = checkpoint_without_near_ties(CONFIG, rng, (7, 3), NEW_TOKENS)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 11))
    ref = np.stack([np_reference.forward(CONFIG.to_hf(), weights, row) for row in ids])
    return {"weights": weights, "ids": ids, "ref": ref, "prompts": prompts, "greedy": greedy}


@pytest.mark.parametrize(("tp", "ep"), MESHES, ids=["tp1ep1", "tp2ep2", "tp2ep4", "tp4ep2"])
def test_score_and_greedy_tokens_match_reference(tp, ep, ckpt):
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


def test_low_latency_manager_gives_the_reference_tokens(ckpt, monkeypatch):
    """Mixtral with every MoE block on the low-latency manager (its all_to_all form on CPU)."""
    import models.mixtral
    from spmd.expert_parallel import LowLatencyAll2AllManager

    monkeypatch.setattr(models.mixtral, "default_moe_manager", lambda platform=None: "low_latency")
    init(2, 2)
    model = models.load_state_dict(CONFIG, ckpt["weights"])
    manager = model.module.model.layers[0].mlp.manager
    assert isinstance(manager, LowLatencyAll2AllManager) and manager.fallback is None
    np.testing.assert_allclose(np.asarray(models.score(model, ckpt["ids"])), ckpt["ref"], rtol=0, atol=1e-3)
    assert models.generate(model, ckpt["prompts"], NEW_TOKENS) == [want for want, _ in ckpt["greedy"]]


def test_moe_manager_is_the_measured_fastest():
    assert default_moe_manager("gpu") == "low_latency"  # with naive as its fallback until it has buffers
    assert default_moe_manager("cpu") == "naive"  # docs/expert_parallel.md


def _expected_shapes(config, *, moe: bool, fused: bool = False) -> dict:
    """The checkpoint's tensor shapes, written out from Hugging Face's layout (PyTorch ``[out, in]``)."""
    h, d, i, e = config.hidden_size, config.head_dim, config.intermediate_size, config.num_local_experts
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    out = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h)}
        out |= {p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if not moe:
            out |= {
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        elif fused:
            out |= {p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * i, h)}
            out[p + "mlp.experts.down_proj"] = (e, h, i)
        else:
            out[p + "block_sparse_moe.gate.weight"] = (e, h)
            for j in range(e):
                x = f"{p}block_sparse_moe.experts.{j}."
                out |= {x + "w1.weight": (i, h), x + "w3.weight": (i, h), x + "w2.weight": (h, i)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, h)
    return out


def test_each_class_describes_its_own_checkpoint():
    """Llama's shapes never name Mixtral's tensors (the MLP is a hook Mixtral overrides), and vice versa."""
    from models.llama import LlamaForCausalLM
    from models.mixtral import MixtralForCausalLM

    config = mixtral_config()
    assert LlamaForCausalLM.checkpoint_shapes(config) == _expected_shapes(config, moe=False)
    assert MixtralForCausalLM.checkpoint_shapes(config) == _expected_shapes(config, moe=True)
    fused = MixtralForCausalLM.checkpoint_shapes(config, fused_experts=True)
    assert fused == _expected_shapes(config, moe=True, fused=True)
    with pytest.raises(TypeError, match="fused_experts"):
        LlamaForCausalLM.checkpoint_shapes(config, fused_experts=True)


@pytest.mark.parametrize("fused", [False, True])
def test_weight_sources_read_exactly_the_checkpoint_tensors(fused):
    """Every tensor a parameter is made of is in the checkpoint's shapes, and every checkpoint tensor is read."""
    from flax import nnx

    from models.llama import LlamaForCausalLM
    from models.mixtral import MixtralForCausalLM

    config = mixtral_config()
    model = nnx.eval_shape(lambda: MixtralForCausalLM(config, tp_size=1, rngs=nnx.Rngs(0)))
    read = {t for src in model.weight_sources(fused_experts=fused) for t in src.tensors}
    assert read == set(_expected_shapes(config, moe=True, fused=fused))
    dense_config = mixtral_config(architecture="LlamaForCausalLM", num_local_experts=0, num_experts_per_tok=0)
    dense = nnx.eval_shape(lambda: LlamaForCausalLM(dense_config, tp_size=1, rngs=nnx.Rngs(0)))
    assert {t for src in dense.weight_sources() for t in src.tensors} == set(_expected_shapes(dense_config, moe=False))
    with pytest.raises(TypeError, match="fused_experts"):
        dense.weight_sources(fused_experts=fused)
