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
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import spmd
from models.checkpoint_files import CheckpointDir
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
    "read_config",
    "write_checkpoint",
]

MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "MixtralForCausalLM": MixtralForCausalLM}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class _LazyTensor:
    """A safetensors slice with ``.shape``, ``.dtype`` (safetensors' name) and numpy basic indexing."""

    def __init__(self, sl: Any):
        self._slice = sl
        self.shape = tuple(sl.get_shape())
        self.dtype = sl.get_dtype()  # "F32", "BF16", "I64", "BOOL", ...

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._slice[index]


def _is_float(dtype: Any) -> bool:
    """Whether a tensor's dtype (a numpy / ml_dtypes dtype, or safetensors' name) is a floating-point one."""
    if isinstance(dtype, str):  # safetensors: F64 F32 F16 BF16 F8_E4M3 ...; integers I*/U*, BOOL, complex C*
        return dtype.startswith(("F", "BF"))
    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


class _SafetensorsDir(contextlib.AbstractContextManager):
    """The tensors of a checkpoint directory, by name, opened lazily, each file only inside the directory."""

    def __init__(self, path: str, op: str = "from_pretrained"):
        self.path = path
        self.op = op
        self.dir = CheckpointDir(path, op=op)
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}
        if self.dir.exists(_INDEX):
            try:
                index = json.loads(self.dir.read_text(_INDEX, what=_INDEX))
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{op}: {_INDEX} in {path} is not a checkpoint index ({e!r}).") from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{op}: {_INDEX} in {path}: weight_map is not an object: {weight_map!r:.80}")
            for name, file in weight_map.items():  # every entry, before any shard is opened
                self.dir.resolve(file, what=f"{_INDEX} entry {name!r} ->")
            self.files = dict(weight_map)
        elif self.dir.exists(_SINGLE):
            self.files = {k: _SINGLE for k in self._file(_SINGLE).keys()}
        else:
            raise FileNotFoundError(f"{op}: expected {_SINGLE} or {_INDEX} in {path}; found neither.")

    def _file(self, file: str, name: str | None = None) -> Any:
        """The open safetensors file ``file`` (opened once: a regular file inside the directory)."""
        from safetensors import safe_open

        if file in self._open:
            return self._open[file]
        what = _SINGLE if name is None else f"{_INDEX} entry {name!r} ->"
        try:
            with self.dir.open_fd(file, what=what) as (fd, real):
                # safetensors opens a path: hand it the checked file itself, never the name again (/proc/self/fd)
                target = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else real
                try:
                    handle = self._stack.enter_context(safe_open(target, framework="numpy"))
                except Exception as e:  # safetensors' SafetensorError: a truncated file, a bad header
                    raise ValueError(f"{self.op}: {file} in {self.path} is not a valid safetensors file: {e}") from None
        except FileNotFoundError:
            if name is None:
                raise
            raise FileNotFoundError(f"{self.op}: {_INDEX} lists {file} (for {name}), which is missing.") from None
        self._open[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def where(self, name: str) -> str:
        return os.path.join(self.path, self.files.get(name, _INDEX if len(set(self.files.values())) > 1 else _SINGLE))

    def get(self, name: str) -> _LazyTensor:
        return _LazyTensor(self._file(self.files[name], name).get_slice(name))

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


class _DictSource(contextlib.AbstractContextManager):
    """In-memory tensors (numpy arrays) by name."""

    def __init__(self, tensors: Mapping[str, Any]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

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


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.")
_FUSED = "model.layers.0.mlp.experts.gate_up_proj"


def _check_counts(config: ModelConfig, source: Any, op: str) -> None:
    """Refuse a config that asks for more layers / experts than the checkpoint holds (before anything is sized)."""
    names = source.names()
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    if config.num_hidden_layers > len(layers):
        raise ValueError(
            f"{op}: config.json asks for num_hidden_layers={config.num_hidden_layers}, but the checkpoint "
            f"({source.where('model.layers.0.')}) holds tensors of {len(layers)} layers; fix num_hidden_layers."
        )
    if not config.is_moe:
        return
    if _FUSED in source:
        held = source.get(_FUSED).shape[:1]
        held = held[0] if held else 0
    else:
        held = len({int(m.group(1)) for n in names if (m := _EXPERT.match(n))})
    if config.num_local_experts > held:
        raise ValueError(
            f"{op}: config.json asks for num_local_experts={config.num_local_experts}, but the checkpoint "
            f"({source.where(_FUSED)}) holds {held} experts per layer; fix num_local_experts."
        )


def _check_tensors(config: ModelConfig, source: Any, expected: Mapping[str, tuple[int, ...]], op: str) -> None:
    """Every tensor the model needs is there, with the config's shape and a floating-point dtype."""
    for name, shape in expected.items():
        if name not in source:
            needed = f"needed by {config.architecture}"
            raise ValueError(f"{op}: missing tensor {name!r} in {source.where(name)} ({needed}).")
        t = source.get(name)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{op}: tensor {name!r} in {source.where(name)} has shape {tuple(t.shape)}; expected {shape} "
                "from config.json."
            )
        if not _is_float(t.dtype):
            raise ValueError(
                f"{op}: tensor {name!r} in {source.where(name)} has dtype {t.dtype}; expected a floating-point "
                "weight (an integer or bool tensor is not cast: it is a broken or quantized checkpoint)."
            )


def _load(config: ModelConfig, source: Any, dtype: Any, op: str) -> CausalLM:
    mesh = _mesh_for_loading(op)
    tp, ep = mesh.shape[TP], mesh.shape[EP]
    config.check_parallel(tp, ep)
    cls = MODEL_CLASSES[config.architecture]
    _check_counts(config, source, op)  # bounds what checkpoint_shapes and eval_shape build
    fused = config.is_moe and _FUSED in source
    layout = {"fused_experts": True} if fused else {}  # an expert layout: Mixtral's option only
    expected = cls.checkpoint_shapes(config, **layout)
    _check_tensors(config, source, expected, op)  # every check before the first byte is placed
    abstract = nnx.eval_shape(lambda: cls(config, params_dtype=dtype, tp_size=tp, rngs=nnx.Rngs(0)))
    for src in abstract.weight_sources(**layout):
        loaded = [source.get(name) for name in src.tensors]
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
      FileNotFoundError: no directory, no ``config.json`` or no safetensors file (or a listed shard is
        missing).
      ValueError: an unsupported architecture or a bad config value; a config asking for more layers
        or experts than the checkpoint holds; a missing tensor, one whose shape does not match the
        config or whose dtype is not floating-point (all named); heads / MLP / experts that do not
        split over the mesh (naming the sizes that would); an index entry naming a file outside the
        directory, or a file that is not a regular file (a FIFO, a directory) or not safetensors.
      RuntimeError: model parallel is not initialized.
    """
    path = os.fspath(path)
    config = read_config(path)
    _mesh_for_loading("from_pretrained")
    with _SafetensorsDir(path) as source:
        return _load(config, source, dtype, "from_pretrained")


def read_config(path: str | os.PathLike, *, op: str = "from_pretrained") -> ModelConfig:
    """The :class:`ModelConfig` of checkpoint directory ``path``: its ``config.json``, opened as a checked file.

    Raises:
      FileNotFoundError: ``path`` is not a directory or has no ``config.json``.
      ValueError: ``config.json`` is not a regular file, not JSON, or not a supported config.
    """
    path = os.fspath(path)
    files = CheckpointDir(path, op=op)
    if not files.exists("config.json"):
        raise FileNotFoundError(f"{op}: no config.json in {path}.")
    try:
        cfg = json.loads(files.read_text("config.json", what="config.json", max_bytes=16 << 20))
    except json.JSONDecodeError as e:
        raise ValueError(f"{op}: config.json in {path} is not JSON: {e}.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{op}: config.json in {path}: expected a JSON object, got {type(cfg).__name__}.")
    return ModelConfig.from_hf(cfg)


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
