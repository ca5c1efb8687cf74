"""Seeded random projectors for factored per-layer gradients, and their identity.

A linear layer's per-sample gradient G (d_out x d_in) is projected as P_out G P_in^T with fixed
random matrices P_in (k_in x d_in) and P_out (k_out x d_out). This is the Kronecker-factored
projection that LoGra uses and that AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910) needs
for per-sample influence. Flattened row-major, P_out G P_in^T equals (P_out kron P_in) applied
to G flattened row-major. Entries have variance 1/k, so E[P^T P] = I for each factor. Hence
E[(P_out kron P_in)^T (P_out kron P_in)] = I, and projected inner products equal exact ones in
expectation.

Each layer's matrices come from a torch.Generator on CPU, seeded by a BLAKE2b hash of
(seed, layer name, "in"/"out"). The same seed therefore gives the same matrices on every machine
and in every process, whatever other layers are projected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

PROJECTOR_KINDS = ("rademacher", "gaussian")
# Projected features are always produced and stored in float32.
FEATURE_DTYPE = "float32"


class ProjectorMismatchError(ValueError):
    """Two feature sets were made with different projectors and cannot be compared."""


@dataclass(frozen=True, kw_only=True)
class ProjectorIdentity:
    """Everything that determines a feature set's projection: same identity, same matrices."""

    kind: str
    seed: int
    k_in: int
    k_out: int
    # (module name, d_in, d_out) per projected layer, in feature-block order.
    layers: tuple[tuple[str, int, int], ...]
    dtype: str = FEATURE_DTYPE
    # Content fingerprint of the checkpoint whose gradients are projected.
    model_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = [list(layer) for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProjectorIdentity":
        """Build an identity from ``to_dict()`` output (lists for tuples, as after JSON)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"projector identity has unknown field(s) {unknown}; allowed: {sorted(fields)}")
        values = dict(data)
        values["layers"] = tuple((str(name), int(d_in), int(d_out)) for name, d_in, d_out in data.get("layers", ()))
        return cls(**values)

    def fingerprint(self) -> str:
        """Return 16 hex digits of SHA-256 over the identity's canonical JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def restricted_to(self, layer_names: list[str]) -> "ProjectorIdentity":
        """Return the identity of the same projector over ``layer_names`` only, in that order."""
        by_name = {layer[0]: layer for layer in self.layers}
        missing = [name for name in layer_names if name not in by_name]
        if missing:
            raise ValueError(f"layers {missing} are not in the projector identity; known: {list(by_name)}")
        return dataclasses.replace(self, layers=tuple(by_name[name] for name in layer_names))

    def check_compatible(self, other: "ProjectorIdentity") -> None:
        """Raise :class:`ProjectorMismatchError` naming both identities if any field differs."""
        differing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if not differing:
            return
        details = "; ".join(f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}" for name in differing)
        raise ProjectorMismatchError(
            f"projector identities differ in {', '.join(differing)} ({details}); "
            f"identity {self.fingerprint()} = {self.to_dict()} and identity {other.fingerprint()} = "
            f"{other.to_dict()}. Recompute both feature sets with the same projection config, "
            "layers and checkpoint")


def layer_seed(seed: int, layer_name: str, side: str) -> int:
    """Return a 63-bit generator seed from BLAKE2b over (seed, layer name, side); stable across runs."""
    digest = hashlib.blake2b(f"{seed}\x00{layer_name}\x00{side}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_matrix(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Draw a [rows, cols] float32 CPU matrix with entries of variance 1/rows (N(0, 1/k) or ±1/sqrt(k))."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8).float() * 2.0 - 1.0
    else:
        raise ValueError(f"projector kind {kind!r} is invalid; allowed: {', '.join(PROJECTOR_KINDS)}")
    return matrix / rows**0.5


class Projector:
    """Per-layer projection matrices P_in [k_in, d_in] and P_out [k_out, d_out].

    ``layer_shapes`` maps each layer name to (d_in, d_out) in feature-block order. Matrices are
    generated lazily on CPU in float32 and cached per (layer, device, dtype).
    """

    def __init__(self, kind: str, seed: int, k_in: int, k_out: int,
                 layer_shapes: Mapping[str, tuple[int, int]], model_fingerprint: str = "") -> None:
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector kind {kind!r} is invalid; allowed: {', '.join(PROJECTOR_KINDS)}")
        if k_in < 1 or k_out < 1:
            raise ValueError(f"projection dimensions k_in={k_in}, k_out={k_out} are invalid; both must be >= 1")
        if not layer_shapes:
            raise ValueError("layer_shapes is empty; pass (d_in, d_out) for at least one layer")
        self.kind = kind
        self.seed = int(seed)
        self.k_in = int(k_in)
        self.k_out = int(k_out)
        self.layer_shapes = {name: (int(d_in), int(d_out)) for name, (d_in, d_out) in layer_shapes.items()}
        self.model_fingerprint = model_fingerprint
        self._cache: dict[tuple[str, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config, layer_shapes: Mapping[str, tuple[int, int]],
                    model_fingerprint: str = "") -> "Projector":
        """Build from a :class:`automixer_ray.config.ProjectionConfig`."""
        return cls(config.kind, config.seed, config.k_in, config.k_out, layer_shapes, model_fingerprint)

    @property
    def block_size(self) -> int:
        """Feature entries per layer: k_out * k_in."""
        return self.k_in * self.k_out

    @property
    def dim(self) -> int:
        """Total feature dimension over all layers."""
        return self.block_size * len(self.layer_shapes)

    @property
    def identity(self) -> ProjectorIdentity:
        layers = tuple((name, d_in, d_out) for name, (d_in, d_out) in self.layer_shapes.items())
        return ProjectorIdentity(kind=self.kind, seed=self.seed, k_in=self.k_in, k_out=self.k_out,
                                 layers=layers, dtype=FEATURE_DTYPE, model_fingerprint=self.model_fingerprint)

    def restricted_to(self, layer_names: list[str]) -> "Projector":
        """Return a projector over ``layer_names`` only; its matrices equal this one's."""
        missing = [name for name in layer_names if name not in self.layer_shapes]
        if missing:
            raise ValueError(f"layers {missing} are not projected here; known: {list(self.layer_shapes)}")
        return Projector(self.kind, self.seed, self.k_in, self.k_out,
                         {name: self.layer_shapes[name] for name in layer_names}, self.model_fingerprint)

    def matrices(self, layer_name: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (P_in [k_in, d_in], P_out [k_out, d_out]) for one layer on ``device`` in ``dtype``."""
        if layer_name not in self.layer_shapes:
            raise KeyError(f"layer {layer_name!r} is not projected here; known: {list(self.layer_shapes)}")
        key = (layer_name, str(device), dtype)
        if key not in self._cache:
            d_in, d_out = self.layer_shapes[layer_name]
            p_in = random_matrix(self.kind, self.k_in, d_in, layer_seed(self.seed, layer_name, "in"))
            p_out = random_matrix(self.kind, self.k_out, d_out, layer_seed(self.seed, layer_name, "out"))
            self._cache[key] = (p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype))
        return self._cache[key]
