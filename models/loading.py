"""Load local Hugging Face checkpoints (safetensors), each device receiving only its shard.

:func:`from_pretrained` reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) with the ``safetensors`` package, builds the decoder abstractly
(``nnx.eval_shape``: no weights allocated), and places every parameter with
``jax.make_array_from_callback``: the callback of each device reads that device's slice of the
checkpoint tensors (lazy safetensors slices) and nothing else, so the whole model never sits on
one device (nor, for TP-sharded tensors, in host memory at once).

:func:`write_checkpoint` and :func:`random_checkpoint` write and make checkpoints in the Hugging
Face layout (tests, the demo in ``python -m models.generate``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import spmd
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.mixtral import MixtralForCausalLM
from models.runner import CausalLM, shard_causal_lm
from spmd import EP, TP

__all__ = [
    "MODEL_CLASSES",
    "from_pretrained",
    "fuse_experts",
    "load_state_dict",
    "random_checkpoint",
    "write_checkpoint",
]

MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "MixtralForCausalLM": MixtralForCausalLM}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class _LazyTensor:
    """A safetensors slice with ``.shape`` and numpy basic indexing (reads only what is indexed)."""

    def __init__(self, sl: Any):
        self._slice = sl
        self.shape = tuple(sl.get_shape())

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._slice[index]


class _SafetensorsDir(contextlib.AbstractContextManager):
    """The tensors of a checkpoint directory, by name, opened lazily."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, _INDEX)
        single = os.path.join(path, _SINGLE)
        if os.path.exists(index):
            with open(index) as f:
                self.files = dict(json.load(f)["weight_map"])
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="numpy") as f:
                self.files = {k: _SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"from_pretrained: expected {_SINGLE} or {_INDEX} in {path}; found neither.")
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> str:
        return os.path.join(self.path, self.files.get(name, _INDEX if len(set(self.files.values())) > 1 else _SINGLE))

    def get(self, name: str) -> _LazyTensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            full = os.path.join(self.path, file)
            if not os.path.exists(full):
                raise FileNotFoundError(f"from_pretrained: {_INDEX} lists {file} (for {name}), which is missing.")
            self._open[file] = self._stack.enter_context(safe_open(full, framework="numpy"))
        return _LazyTensor(self._open[file].get_slice(name))

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


class _DictSource(contextlib.AbstractContextManager):
    """In-memory tensors (numpy arrays) by name."""

    def __init__(self, tensors: Mapping[str, Any]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def where(self, name: str) -> str:
        return "the state dict"

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name])

    def __exit__(self, *exc: Any) -> None:
        return None


def _mesh_for_loading(op: str) -> Any:
    if not spmd.model_parallel_is_initialized():
        raise RuntimeError(
            f"{op}: model parallel is not initialized; call spmd.initialize_model_parallel("
            f"tensor_model_parallel_size=..., expert_model_parallel_size=...) first."
        )
    return spmd.get_mesh()


def _load(config: ModelConfig, source: Any, dtype: Any, op: str) -> CausalLM:
    mesh = _mesh_for_loading(op)
    tp, ep = mesh.shape[TP], mesh.shape[EP]
    config.check_parallel(tp, ep)
    cls = MODEL_CLASSES[config.architecture]
    fused = config.is_moe and "model.layers.0.mlp.experts.gate_up_proj" in source
    layout = {"fused_experts": True} if fused else {}  # an expert layout: Mixtral's option only
    expected = cls.checkpoint_shapes(config, **layout)
    abstract = nnx.eval_shape(lambda: cls(config, params_dtype=dtype, tp_size=tp, rngs=nnx.Rngs(0)))
    for src in abstract.weight_sources(**layout):
        loaded = []
        for name in src.tensors:
            if name not in source:
                raise ValueError(
                    f"{op}: missing tensor {name!r} in {source.where(name)} (needed by {config.architecture})."
                )
            t = source.get(name)
            if tuple(t.shape) != expected[name]:
                raise ValueError(
                    f"{op}: tensor {name!r} in {source.where(name)} has shape {tuple(t.shape)}; expected "
                    f"{expected[name]} from config.json."
                )
            loaded.append(t)
        variable = getattr(src.owner, src.name)
        aval = variable.get_value()
        spec = nnx.get_partition_spec(variable).get_value()
        variable.set_value(_place(aval, NamedSharding(mesh, spec), src.shard, loaded))
    module = abstract
    for path, leaf in nnx.to_flat_state(nnx.state(module)):
        if isinstance(leaf.get_value(), jax.ShapeDtypeStruct):  # a parameter no source filled: a bug here
            raise RuntimeError(f"{op}: parameter {'/'.join(map(str, path))} was not loaded.")
    return shard_causal_lm(module, mesh=mesh)


def _place(aval: jax.ShapeDtypeStruct, sharding: NamedSharding, shard: Any, loaded: list) -> jax.Array:
    """The global array of ``aval`` whose every device shard is ``shard(loaded, index)`` (read once per index)."""
    memo: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in memo:
            memo[key] = np.ascontiguousarray(np.asarray(shard(loaded, index)).astype(aval.dtype))
        return memo[key]

    return jax.make_array_from_callback(aval.shape, sharding, callback)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.bfloat16) -> CausalLM:
    """Load a local Hugging Face ``LlamaForCausalLM`` / ``MixtralForCausalLM`` directory onto the mesh.

    Call after :func:`spmd.initialize_model_parallel`; every tensor is placed sharded as it loads.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or several shards and
        ``model.safetensors.index.json``).
      dtype: the parameters' dtype (tensors are cast as they load).

    Returns:
      A :class:`~models.runner.CausalLM` for :func:`models.score` and :func:`models.generate`.

    Raises:
      FileNotFoundError: no ``config.json`` or no safetensors file (or a listed shard is missing).
      ValueError: an unsupported architecture, a missing tensor or one whose shape does not match
        the config (both named), heads / MLP / experts that do not split over the mesh (naming
        the sizes that would).
      RuntimeError: model parallel is not initialized.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"from_pretrained: no config.json in {path}.")
    with open(config_path) as f:
        config = ModelConfig.from_hf(json.load(f))
    _mesh_for_loading("from_pretrained")
    with _SafetensorsDir(path) as source:
        return _load(config, source, dtype, "from_pretrained")


def load_state_dict(
    config: ModelConfig | Mapping[str, Any], tensors: Mapping[str, Any], *, dtype: Any = jnp.float32
) -> CausalLM:
    """:func:`from_pretrained` from memory: a config (or ``config.json`` dict) and Hugging Face-named arrays."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_hf(config)
    return _load(config, _DictSource(tensors), dtype, "load_state_dict")


# ---------------------------------------------------------------------------------------------------
# Writing checkpoints


def random_checkpoint(config: ModelConfig, *, seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Random weights in the Hugging Face layout (the hub's expert layout for Mixtral).

    Scaled so activations stay of order one and logits are spread (a greedy choice is rarely a
    near-tie): matrices ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``, norms ``1 + N(0, 0.1)``.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in MODEL_CLASSES[config.architecture].checkpoint_shapes(config).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = w.astype(dtype)
    return out


def fuse_experts(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Mixtral checkpoint in the hub's layout rewritten in transformers 5's fused expert layout."""
    out = dict(tensors)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        x = f"{p}block_sparse_moe.experts."
        e = range(config.num_local_experts)
        w1 = [out.pop(f"{x}{j}.w1.weight") for j in e]
        w3 = [out.pop(f"{x}{j}.w3.weight") for j in e]
        out[f"{p}mlp.experts.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(w1, w3, strict=True)])
        out[f"{p}mlp.experts.down_proj"] = np.stack([out.pop(f"{x}{j}.w2.weight") for j in e])
        out[f"{p}mlp.gate.weight"] = out.pop(f"{p}block_sparse_moe.gate.weight")
    return out


def _chunks(names: list[str], n: int) -> Iterator[list[str]]:
    size = -(-len(names) // n)
    for i in range(n):
        yield names[i * size : (i + 1) * size]


def write_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    num_shards: int = 1,
    style: str = "hub",
) -> None:
    """Write a Hugging Face checkpoint directory: ``config.json`` and safetensors file(s).

    Args:
      path: the directory (created if needed).
      config: written as ``config.json`` in ``style`` (``"hub"`` or ``"transformers5"``, see
        :meth:`ModelConfig.to_hf`).
      tensors: Hugging Face-named arrays (numpy, any dtype numpy or ml_dtypes knows).
      num_shards: ``1``: ``model.safetensors``; more: ``model-0000i-of-0000n.safetensors`` and
        ``model.safetensors.index.json``.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(style=style), f, indent=1)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if num_shards == 1:
        save_file(arrays, os.path.join(path, _SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(_chunks(sorted(arrays), num_shards)):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: arrays[k] for k in names}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(a.nbytes for a in arrays.values())
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
