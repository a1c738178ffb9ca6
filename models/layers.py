"""vLLM's tensor-parallel layers as Flax NNX modules: per-device math, sharding as parameter metadata.

Names and arguments follow vLLM's ``model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``:

==============================  ====================================  =================================
layer                           weight (global, ``[in, out]``)         per-device call
==============================  ====================================  =================================
``ColumnParallelLinear``        ``[in, out]``, out over "tp"           ``x @ W_r + b_r`` (all-gather if
                                                                       ``gather_output``)
``MergedColumnParallelLinear``  ``[in, sum(out_k)]``; rank r holds     ``x @ [A_r | B_r ...]``
                                ``[A_r | B_r | ...]`` (its slice of
                                every sub-matrix)
``QKVParallelLinear``           rank r holds ``[Q_r | K_r | V_r]``;    ``x @ [Q_r | K_r | V_r]``
                                when tp > KV heads, its one KV head
                                (each replicated ``tp // kv`` times)
``RowParallelLinear``           ``[in, out]``, in over "tp"            ``all_reduce(x_r @ W_r) + b``
``VocabParallelEmbedding``      ``[vocab_padded, hidden]``, rows over  masked lookup, then all-reduce
                                "tp"; vocab padded to 64 x tp
``ParallelLMHead``              as the embedding (or tied to it)       ``all_gather(x @ E_r^T)[:vocab]``
==============================  ====================================  =================================

Weights are ``[in, out]`` (JAX's kernel layout); checkpoints are ``[out, in]`` (PyTorch's).
Global parameters hold every rank's shard side by side in rank order, so a plain ``P(None, "tp")``
places rank r's block on TP rank r, and the fused layers' global layouts depend on the TP size:
a layer reads it when built (``tp_size=None``: the initialized TP group's, else 1), and checks at
call time that it runs on a "tp" axis of that size. ``weight_loader(param, loaded, index)`` builds
one device's shard of a parameter from the checkpoint's tensors (``[out, in]``, anything with
``.shape`` and numpy slicing, e.g. a lazy safetensors slice): only that shard is read.

Collectives go through ``spmd``'s TP group (``tensor_model_parallel_all_reduce`` /
``_all_gather``), so the platform communicator, and the custom all-reduce where it is eligible, is
what runs. Call a layer inside ``shard_map`` (e.g. through :func:`models.sharding.shard_module`).
The two vocabulary layers live in :mod:`models.vocab`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import spmd
from models import decode_kernels
from models.sharding import partitioned
from spmd import TP

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "resolve_tp_size",
]

DEFAULT_VOCAB_PADDING_SIZE = 64


def resolve_tp_size(tp_size: int | None) -> int:
    """``tp_size``, or the initialized TP group's size, or 1 when model parallel is not initialized."""
    if tp_size is None:
        return spmd.get_tensor_model_parallel_world_size() if spmd.model_parallel_is_initialized() else 1
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"expected a positive int tp_size, got {tp_size!r}.")
    return tp_size


def _divisors_note(n: int) -> str:
    return f"TP sizes that divide it: {[d for d in range(1, n + 1) if n % d == 0]}"


def _split(layer: str, what: str, n: int, tp: int) -> int:
    if n % tp:
        raise ValueError(f"{layer}: {what}={n} cannot be split over tp={tp}; {_divisors_note(n)}.")
    return n // tp


def _check_tp(layer: Any) -> None:
    n = spmd.axis_size(TP, op=type(layer).__name__)
    if n != layer.tp_size:
        raise ValueError(
            f"{type(layer).__name__}: built for tp_size={layer.tp_size} but called on a 'tp' axis of size {n}; "
            f"build the model after spmd.initialize_model_parallel(tensor_model_parallel_size={n})."
        )


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return decode_kernels.matmul(x, w)  # the GEMV kernel for decode-sized inputs where it was measured faster


def _rank(index: tuple[slice, ...], dim: int, per_rank: int) -> int:
    start = index[dim].start or 0
    return start // per_rank


def _rows(t: Any, start: int, stop: int) -> np.ndarray:
    return np.asarray(t[start:stop])


def _param(init, spec, rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    return nnx.Param(partitioned(init, spec)(rngs.params(), shape, dtype))


class ColumnParallelLinear(nnx.Module):
    """``y = x W + b`` with ``W``'s output columns split over "tp" (vLLM's ``ColumnParallelLinear``).

    Args:
      input_size: the input width.
      output_size: the (global) output width; divisible by the TP size.
      bias: whether there is a bias.
      gather_output: all-gather the output over "tp" (else each rank keeps its columns).
      skip_bias_add: return the bias instead of adding it, for the caller to fuse.
      params_dtype: the parameters' dtype.
      return_bias: return ``(output, output_bias)`` as vLLM does; ``False``: the output alone.
      tp_size: the TP size the layout is for (default: the initialized TP group's, else 1).
      rngs: ``nnx.Rngs`` for initialisation.

    Raises:
      ValueError: an output width that does not split over the TP size.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: Any = jnp.float32,
        return_bias: bool = True,
        tp_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.tp_size = resolve_tp_size(tp_size)
        self.input_size = int(input_size)
        self.output_sizes = self._output_sizes(output_size)
        self.output_size = sum(self.output_sizes)
        self.output_size_per_partition = self._per_partition()
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.return_bias = return_bias
        init = nnx.initializers.normal(stddev=self.input_size**-0.5)
        shape = (self.input_size, self.output_size_per_partition * self.tp_size)
        self.weight = _param(init, (None, TP), rngs, shape, params_dtype)
        self.bias = _param(init, (TP,), rngs, shape[1:], params_dtype) if bias else None

    # layout ---------------------------------------------------------------------------------------

    def _output_sizes(self, output_size: int) -> tuple[int, ...]:
        return (int(output_size),)

    def _per_partition(self) -> int:
        return sum(_split(type(self).__name__, "output_size", n, self.tp_size) for n in self.output_sizes)

    def shard_rows(self, rank: int) -> list[tuple[int, int, int]]:
        """Rank ``rank``'s output columns: ``(checkpoint tensor, first row, end row)`` per block, in order."""
        n = self.output_size // self.tp_size
        return [(0, rank * n, (rank + 1) * n)]

    def weight_loader(self, param: str, loaded: Sequence[Any], index: tuple[slice, ...]) -> np.ndarray:
        """One device's shard of ``param`` ("weight" or "bias") from the checkpoint's ``[out, in]`` tensors."""
        rank = _rank(index, -1, self.output_size_per_partition)
        blocks = [_rows(loaded[k], a, b) for k, a, b in self.shard_rows(rank)]
        shard = np.concatenate(blocks, axis=0)
        return shard.T if param == "weight" else shard

    # call -----------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array) -> Any:
        """``T[..., input_size] -> T[..., out_r]`` (``T[..., output_size]`` with ``gather_output``).

        Returns:
          ``(output, output_bias)`` (``output_bias`` is this rank's bias with ``skip_bias_add``,
          else ``None``), or the output alone with ``return_bias=False``.
        """
        _check_tp(self)
        y = _dot(x, self.weight[...])
        bias = None if self.bias is None else self.bias[...]
        if bias is not None and not self.skip_bias_add:
            y = y + bias.astype(y.dtype)
        if self.gather_output:
            y = spmd.tensor_model_parallel_all_gather(y, dim=-1)
        out_bias = bias if self.skip_bias_add else None
        return (y, out_bias) if self.return_bias else y

    def partials(self, x: jax.Array) -> jax.Array:
        """``x[M, input_size] @ W_r`` as float32 split-K partial sums ``[P, M, out_r]`` (no bias, no gather).

        For a consumer that sums them itself (the fused decode attention): the GEMV kernel's
        partials where it runs, else the product in float32 with ``P = 1``.

        Raises:
          ValueError: the layer has a bias or gathers its output.
        """
        _check_tp(self)
        if self.bias is not None or self.gather_output:
            raise ValueError(f"{type(self).__name__}.partials: expected no bias and no gather_output.")
        return decode_kernels.matmul_partials(x, self.weight[...])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices as one (gate and up): rank r holds ``[A_r | B_r | ...]``.

    Args:
      input_size: the input width.
      output_sizes: each sub-matrix's output width, each divisible by the TP size.
      **kwargs: as :class:`ColumnParallelLinear`.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], **kwargs: Any):
        self._given_sizes = tuple(int(n) for n in output_sizes)
        super().__init__(input_size, sum(self._given_sizes), **kwargs)

    def _output_sizes(self, output_size: int) -> tuple[int, ...]:
        return self._given_sizes

    def shard_rows(self, rank: int) -> list[tuple[int, int, int]]:
        out = []
        for k, n in enumerate(self.output_sizes):
            m = n // self.tp_size
            out.append((k, rank * m, (rank + 1) * m))
        return out

    def split_output(self, y: jax.Array) -> list[jax.Array]:
        """This rank's output ``[..., out_r]`` cut into its sub-matrices' columns."""
        cuts = np.cumsum([n // self.tp_size for n in self.output_sizes])[:-1]
        return jnp.split(y, cuts, axis=-1)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused Q, K, V projection, heads split over "tp" (vLLM's ``QKVParallelLinear``).

    Rank r holds ``[Q_r | K_r | V_r]``: ``total_num_heads / tp`` query heads and, when
    ``tp <= total_num_kv_heads``, ``total_num_kv_heads / tp`` KV heads; when ``tp`` exceeds the KV
    heads, one KV head, head ``r // (tp // total_num_kv_heads)`` (each KV head replicated
    ``tp // total_num_kv_heads`` times), so a rank's query heads always find their KV head locally.

    Args:
      hidden_size: the input width.
      head_size: per head.
      total_num_heads: query heads, divisible by the TP size.
      total_num_kv_heads: KV heads (default: ``total_num_heads``); divisible by the TP size, or
        dividing it.
      **kwargs: as :class:`ColumnParallelLinear`.

    Raises:
      ValueError: head counts that do not split over the TP size (naming the sizes that would).
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        **kwargs: Any,
    ):
        self.head_size = int(head_size)
        self.total_num_heads = int(total_num_heads)
        self.total_num_kv_heads = int(total_num_kv_heads or total_num_heads)
        tp = resolve_tp_size(kwargs.get("tp_size"))
        kv = self.total_num_kv_heads
        self.num_heads = _split("QKVParallelLinear", "total_num_heads", self.total_num_heads, tp)
        if tp >= kv:
            if tp % kv:
                works = [t for t in range(1, self.total_num_heads + 1) if self._tp_ok(t)]
                raise ValueError(
                    f"QKVParallelLinear: total_num_kv_heads={kv} cannot be split over or replicated on tp={tp} "
                    f"(tp must be a multiple or a divisor of it); TP sizes that work: {works}."
                )
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp // kv
        else:
            self.num_kv_heads = _split("QKVParallelLinear", "total_num_kv_heads", kv, tp)
            self.num_kv_head_replicas = 1
        output = (self.total_num_heads + 2 * max(kv, tp)) * self.head_size  # global: every rank's block
        super().__init__(hidden_size, output, **kwargs)

    def _tp_ok(self, t: int) -> bool:
        kv = self.total_num_kv_heads
        return self.total_num_heads % t == 0 and ((t >= kv and t % kv == 0) or (t < kv and kv % t == 0))

    def _output_sizes(self, output_size: int) -> tuple[int, ...]:
        tp, d = self.tp_size, self.head_size
        return (self.num_heads * d * tp, self.num_kv_heads * d * tp, self.num_kv_heads * d * tp)

    def shard_rows(self, rank: int) -> list[tuple[int, int, int]]:
        d = self.head_size
        q = self.num_heads * d
        kv_head = rank // self.num_kv_head_replicas * self.num_kv_heads
        kv = self.num_kv_heads * d
        return [(0, rank * q, (rank + 1) * q), (1, kv_head * d, kv_head * d + kv), (2, kv_head * d, kv_head * d + kv)]

    def split_output(self, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """This rank's ``[..., out_r]`` as ``(q [..., heads_r, d], k [..., kv_r, d], v [..., kv_r, d])``."""
        d, q, kv = self.head_size, self.num_heads, self.num_kv_heads
        lead = y.shape[:-1]
        return (
            y[..., : q * d].reshape(*lead, q, d),
            y[..., q * d : (q + kv) * d].reshape(*lead, kv, d),
            y[..., (q + kv) * d :].reshape(*lead, kv, d),
        )


class RowParallelLinear(nnx.Module):
    """``y = all_reduce(x_r W_r) + b`` with ``W``'s input rows split over "tp" (vLLM's ``RowParallelLinear``).

    The bias is added once, after the reduction (not once per rank).

    Args:
      input_size: the (global) input width; divisible by the TP size.
      output_size: the output width.
      bias: whether there is a bias.
      input_is_parallel: the input is already this rank's slice (a column-parallel output);
        ``False``: the full input, of which each rank takes its slice.
      skip_bias_add: return the bias instead of adding it.
      reduce_results: all-reduce over "tp" (``False``: return the partial sums).
      params_dtype, return_bias, tp_size, rngs: as :class:`ColumnParallelLinear`.

    Raises:
      ValueError: ``reduce_results=False`` with a bias that is added (each rank would add it to a
        partial sum), or an input width that does not split over the TP size.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        reduce_results: bool = True,
        params_dtype: Any = jnp.float32,
        return_bias: bool = True,
        tp_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        if not reduce_results and bias and not skip_bias_add:
            raise ValueError(
                "RowParallelLinear: reduce_results=False with a bias that is added would add the bias to each "
                "rank's partial sum; pass skip_bias_add=True (and add it after your reduction) or bias=False."
            )
        self.tp_size = resolve_tp_size(tp_size)
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.input_size_per_partition = _split("RowParallelLinear", "input_size", self.input_size, self.tp_size)
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.reduce_results = reduce_results
        self.return_bias = return_bias
        init = nnx.initializers.normal(stddev=self.input_size**-0.5)
        self.weight = _param(init, (TP, None), rngs, (self.input_size, self.output_size), params_dtype)
        self.bias = _param(init, (None,), rngs, (self.output_size,), params_dtype) if bias else None

    def weight_loader(self, param: str, loaded: Sequence[Any], index: tuple[slice, ...]) -> np.ndarray:
        """One device's shard of ``param`` from the checkpoint's ``[out, in]`` weight (or its bias)."""
        (t,) = loaded
        if param == "bias":
            return np.asarray(t[:])
        n = self.input_size_per_partition
        r = _rank(index, 0, n)
        return np.asarray(t[:, r * n : (r + 1) * n]).T

    def __call__(self, x: jax.Array) -> Any:
        """``T[..., in_r] -> T[..., output_size]`` (``T[..., input_size]`` in with ``input_is_parallel=False``).

        Returns:
          ``(output, output_bias)`` as vLLM (``output_bias`` only with ``skip_bias_add``), or the
          output alone with ``return_bias=False``.
        """
        _check_tp(self)
        if not self.input_is_parallel:
            n = self.input_size_per_partition
            x = lax.dynamic_slice_in_dim(x, spmd.axis_index(TP) * n, n, axis=x.ndim - 1)
        y = _dot(x, self.weight[...])
        if self.reduce_results:
            y = spmd.tensor_model_parallel_all_reduce(y)
        bias = None if self.bias is None else self.bias[...]
        if bias is not None and not self.skip_bias_add:
            y = y + bias.astype(y.dtype)
        out_bias = bias if self.skip_bias_add else None
        return (y, out_bias) if self.return_bias else y

    def partial(self, x: jax.Array, *, split_k: bool = False) -> jax.Array:
        """This rank's partial sums ``x_r W_r`` (no reduction, no bias): for a caller that fuses the reduction.

        ``split_k=True`` (``x[M, in]``) also leaves the product's own split-K partials unsummed: float32
        ``[P, M, output_size]`` (the GEMV kernel's partials where it runs, else ``P = 1``).

        Raises:
          ValueError: the layer has a bias (it must be added once, after the reduction).
        """
        _check_tp(self)
        if self.bias is not None:
            raise ValueError("RowParallelLinear.partial: the layer has a bias; call it whole (it adds the bias once).")
        if not self.input_is_parallel:
            n = self.input_size_per_partition
            x = lax.dynamic_slice_in_dim(x, spmd.axis_index(TP) * n, n, axis=x.ndim - 1)
        if split_k:
            return decode_kernels.matmul_partials(x, self.weight[...])
        return _dot(x, self.weight[...])
