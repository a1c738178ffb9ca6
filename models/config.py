"""The model configuration: a Hugging Face ``config.json`` as a frozen, validated dataclass.

Reads both styles of config in circulation:

* the hub's (transformers 4): top-level ``rope_theta`` and ``rope_scaling`` (``{"rope_type": "llama3",
  "factor": 8.0, ...}``, older files say ``"type"``);
* transformers 5's: ``rope_parameters`` (``{"rope_type": "default", "rope_theta": 500000.0}``).

:meth:`ModelConfig.to_hf` writes either style back, so tests and the demo write real-looking files.
:meth:`ModelConfig.check_parallel` says whether the heads, the MLP and the experts split over a
TP / EP size, and which sizes would work when they do not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM")
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Sane bounds, checked before anything is sized from the config (the checkpoint's own tensor list is checked
# too, by models.loading): sizes index int32 arrays; no released model comes near these layer / expert counts.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 4096
MAX_EXPERTS = 65536


def _positive_int(name: str, value: Any, upper: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"ModelConfig: expected {name} to be an int in [1, {upper}], got {value!r}.")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"ModelConfig: expected {name} to be a finite number > 0, got {value!r}.")
    return value


def _json_number(key: str, value: Any, kind: type = int) -> Any:
    """``value`` of ``config.json``'s ``key`` as ``kind`` (an int must be one; a float may be written as an int)."""
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise ValueError(f"config.json: expected {key} to be {'an int' if kind is int else 'a number'}, got {value!r}.")
    return kind(value)


def _derived_head_dim(hidden: Any, heads: Any) -> Any:
    """``hidden // heads`` when both are positive ints; else ``hidden`` (the dataclass names the bad value)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads))
    return hidden // heads if ok else hidden


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the decoders need from ``config.json``.

    Attributes:
      architecture: ``"LlamaForCausalLM"`` or ``"MixtralForCausalLM"``.
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: as in Hugging Face.
      num_attention_heads, num_key_value_heads: query heads and KV heads (GQA).
      head_dim: per head; ``hidden_size // num_attention_heads`` when the file has none.
      rms_norm_eps: RMSNorm's epsilon.
      rope_theta: RoPE's base.
      rope_scaling: ``None`` (``rope_type`` default) or the llama3 parameters, a tuple of
        ``(key, value)`` pairs with ``rope_type``, ``factor``, ``low_freq_factor``,
        ``high_freq_factor``, ``original_max_position_embeddings``.
      max_position_embeddings: the longest context the model was trained for.
      tie_word_embeddings: the LM head is the embedding (no ``lm_head.weight`` in the file).
      attention_bias, mlp_bias: Llama's optional biases on q/k/v/o and gate/up/down.
      num_local_experts, num_experts_per_tok: Mixtral's experts and top-k (0 for Llama).
      eos_token_id: a token id, a tuple of them, or ``None``.
      bos_token_id: or ``None``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    eos_token_id: int | tuple[int, ...] | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"ModelConfig: architecture {self.architecture!r} is not supported; expected one of "
                f"{list(SUPPORTED_ARCHITECTURES)}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)
        _positive_float("rms_norm_eps", self.rms_norm_eps)
        _positive_float("rope_theta", self.rope_theta)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig: expected num_attention_heads ({self.num_attention_heads}) to be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.is_moe:
            _positive_int("num_local_experts", self.num_local_experts, MAX_EXPERTS)
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ValueError(
                    f"ModelConfig: expected num_experts_per_tok between 1 and num_local_experts="
                    f"{self.num_local_experts}, got {self.num_experts_per_tok!r}."
                )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if scaling.get("rope_type") not in _ROPE_TYPES:
                raise ValueError(
                    f"ModelConfig: rope_type {scaling.get('rope_type')!r} is not supported; expected one of "
                    f"{list(_ROPE_TYPES)}."
                )
            if scaling["rope_type"] == "llama3":
                missing = [k for k in _LLAMA3_KEYS if k not in scaling]
                if missing:
                    raise ValueError(f"ModelConfig: llama3 rope scaling needs {missing} (got {sorted(scaling)}).")
                for key in _LLAMA3_KEYS:
                    _positive_float(f"rope_scaling[{key!r}]", scaling[key])

    @property
    def is_moe(self) -> bool:
        """Mixtral-style: an MoE block instead of the dense MLP."""
        return self.architecture == "MixtralForCausalLM"

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    # ---------------------------------------------------------------------------------------------
    # config.json

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face ``config.json`` dict (either RoPE style).

        Raises:
          ValueError: an unsupported architecture or RoPE type, a missing key, or a bad value.
        """
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), archs[0] if archs else None)
        if arch is None:
            model_type = cfg.get("model_type")
            arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}.get(model_type, model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"config.json: architecture {arch!r} is not supported; expected one of {list(SUPPORTED_ARCHITECTURES)}."
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported; expected 'silu'.")

        def need(key):
            if key not in cfg:
                raise ValueError(f"config.json: missing {key!r} (needed for {arch}).")
            return cfg[key]

        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5
        legacy = dict(cfg.get("rope_scaling") or {})  # the hub's
        if "type" in legacy and "rope_type" not in legacy:
            legacy["rope_type"] = legacy.pop("type")
        rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", "default")
        scaling = None
        if rope_type != "default":
            scaling = tuple(sorted((k, v) for k, v in rope.items() if k in (*_LLAMA3_KEYS, "rope_type")))
        heads = need("num_attention_heads")
        eos = cfg.get("eos_token_id")
        moe = arch == "MixtralForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or _derived_head_dim(need("hidden_size"), heads),
            rms_norm_eps=_json_number("rms_norm_eps", cfg.get("rms_norm_eps", 1e-5), float),
            rope_theta=_json_number("rope_theta", theta, float),
            rope_scaling=scaling,
            max_position_embeddings=_json_number("max_position_embeddings", cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            num_local_experts=_json_number("num_local_experts", cfg.get("num_local_experts", 0)) if moe else 0,
            num_experts_per_tok=_json_number("num_experts_per_tok", cfg.get("num_experts_per_tok", 0)) if moe else 0,
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            bos_token_id=cfg.get("bos_token_id"),
        )

    def to_hf(self, *, style: str = "hub") -> dict[str, Any]:
        """This config as a ``config.json`` dict: ``style="hub"`` (top-level ``rope_theta`` /
        ``rope_scaling``) or ``"transformers5"`` (``rope_parameters``)."""
        if style not in ("hub", "transformers5"):
            raise ValueError(f"ModelConfig.to_hf: expected style 'hub' or 'transformers5', got {style!r}.")
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "mixtral" if self.is_moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "torch_dtype": "float32",
        }
        if not self.is_moe:
            cfg["mlp_bias"] = self.mlp_bias
        else:
            cfg["num_local_experts"] = self.num_local_experts
            cfg["num_experts_per_tok"] = self.num_experts_per_tok
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        if style == "hub":
            cfg["rope_theta"] = self.rope_theta
            cfg["rope_scaling"] = scaling
        else:
            cfg["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta}
        return cfg

    # ---------------------------------------------------------------------------------------------
    # Parallelism

    def parallel_problems(self, tp: int, ep: int = 1) -> list[str]:
        """What does not split over ``tp`` (and ``ep``): an empty list when everything does."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} does not divide by tp={tp}")
        kv = self.num_key_value_heads
        if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
            problems.append(
                f"num_key_value_heads={kv} neither divides by tp={tp} nor divides it (KV heads are split, "
                f"or replicated tp // {kv} times)"
            )
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size} does not divide by tp={tp}")
        if self.is_moe and self.num_local_experts % ep:
            problems.append(f"num_local_experts={self.num_local_experts} does not divide by ep={ep}")
        return problems

    def working_tp_sizes(self) -> list[int]:
        """Every TP size the heads and the MLP split over."""
        return [t for t in range(1, self.num_attention_heads + 1) if not self.parallel_problems(t)]

    def check_parallel(self, tp: int, ep: int = 1) -> None:
        """Raise unless the model splits over ``tp`` x ``ep``.

        Raises:
          ValueError: naming what does not split and the sizes that would.
        """
        problems = self.parallel_problems(tp, ep)
        if not problems:
            return
        fixes = f"TP sizes that work: {self.working_tp_sizes()}"
        if self.is_moe:
            eps = [e for e in range(1, self.num_local_experts + 1) if self.num_local_experts % e == 0]
            fixes += f"; EP sizes that work: {eps}"
        raise ValueError(f"{self.architecture} cannot be split over tp={tp}, ep={ep}: {'; '.join(problems)}. {fixes}.")
