"""Projectors: seeding, scale, Kronecker inner products, and the projector identity."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from automixer_ray.config import ProjectionConfig
from automixer_ray.projection import (
    Projector,
    ProjectorIdentity,
    ProjectorMismatchError,
    layer_seed,
    random_matrix,
)

SHAPES = {"blocks.0.attn": (6, 8), "blocks.1.mlp": (8, 12)}


def make_projector(**overrides) -> Projector:
    arguments = dict(kind="rademacher", seed=3, k_in=4, k_out=5, layer_shapes=SHAPES, model_fingerprint="abc")
    arguments.update(overrides)
    return Projector(**arguments)


def test_layer_seed_is_stable_hash():
    assert layer_seed(0, "blocks.0.attn", "in") == layer_seed(0, "blocks.0.attn", "in")
    assert layer_seed(0, "blocks.0.attn", "in") != layer_seed(1, "blocks.0.attn", "in")
    assert layer_seed(0, "blocks.0.attn", "in") != layer_seed(0, "blocks.0.attn", "out")
    assert layer_seed(0, "blocks.0.attn", "in") != layer_seed(0, "blocks.1.attn", "in")
    # BLAKE2b, not Python's salted hash(): the value is fixed across processes and releases.
    digest = hashlib.blake2b(b"0\x00x\x00in", digest_size=8).digest()
    assert layer_seed(0, "x", "in") == int.from_bytes(digest, "little") & ((1 << 63) - 1)


def test_matrices_shapes_and_determinism():
    first, second = make_projector(), make_projector()
    for name, (d_in, d_out) in SHAPES.items():
        p_in, p_out = first.matrices(name)
        assert p_in.shape == (4, d_in)
        assert p_out.shape == (5, d_out)
        assert p_in.dtype == torch.float32
        q_in, q_out = second.matrices(name)
        assert torch.equal(p_in, q_in)
        assert torch.equal(p_out, q_out)


def test_matrices_depend_on_seed_and_layer():
    p_in, _ = make_projector().matrices("blocks.0.attn")
    other_seed, _ = make_projector(seed=4).matrices("blocks.0.attn")
    assert not torch.equal(p_in, other_seed)
    renamed = make_projector(layer_shapes={"blocks.9.attn": (6, 8)}).matrices("blocks.9.attn")[0]
    assert not torch.equal(p_in, renamed)


def test_restricted_projector_keeps_matrices():
    full = make_projector()
    part = full.restricted_to(["blocks.1.mlp"])
    assert torch.equal(part.matrices("blocks.1.mlp")[0], full.matrices("blocks.1.mlp")[0])
    assert torch.equal(part.matrices("blocks.1.mlp")[1], full.matrices("blocks.1.mlp")[1])
    assert part.identity == full.identity.restricted_to(["blocks.1.mlp"])
    with pytest.raises(ValueError, match="not projected"):
        full.restricted_to(["nope"])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_have_variance_one_over_k(kind):
    matrix = random_matrix(kind, 16, 4096, seed=1)
    assert abs(float(matrix.pow(2).mean()) - 1 / 16) < 0.003
    if kind == "rademacher":
        assert torch.allclose(matrix.abs(), torch.full_like(matrix, 0.25))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_kronecker_projection_preserves_inner_products(kind):
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(8, 6, generator=generator)  # [d_out, d_in]
    second = first + 0.7 * torch.randn(8, 6, generator=generator)
    exact = float((first * second).sum())
    estimates = []
    for seed in range(400):
        projector = Projector(kind, seed, 4, 4, {"layer": (6, 8)})
        p_in, p_out = projector.matrices("layer")
        estimates.append(float(((p_out @ first @ p_in.T) * (p_out @ second @ p_in.T)).sum()))
    # The tolerance leaves room for the spread of a mean over 400 random projectors.
    scale = float(first.norm() * second.norm())
    assert abs(np.mean(estimates) - exact) < 0.15 * scale


def test_projector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        make_projector(kind="sparse")
    with pytest.raises(ValueError, match="k_in=0"):
        make_projector(k_in=0)
    with pytest.raises(ValueError, match="layer_shapes is empty"):
        make_projector(layer_shapes={})
    with pytest.raises(KeyError, match="not projected"):
        make_projector().matrices("nope")


def test_projector_from_config():
    config = ProjectionConfig(kind="gaussian", seed=7, k_in=3, k_out=2)
    projector = Projector.from_config(config, SHAPES, "fp")
    assert projector.identity.kind == "gaussian"
    assert projector.identity.seed == 7
    assert projector.block_size == 6
    assert projector.dim == 12


def test_identity_round_trip_and_fingerprint():
    identity = make_projector().identity
    assert identity.layers == (("blocks.0.attn", 6, 8), ("blocks.1.mlp", 8, 12))
    assert identity.dtype == "float32"
    data = identity.to_dict()
    assert data["layers"] == [["blocks.0.attn", 6, 8], ["blocks.1.mlp", 8, 12]]
    assert ProjectorIdentity.from_dict(data) == identity
    assert ProjectorIdentity.from_dict(data).fingerprint() == identity.fingerprint()
    assert make_projector(seed=4).identity.fingerprint() != identity.fingerprint()
    with pytest.raises(ValueError, match="unknown field"):
        ProjectorIdentity.from_dict({**data, "color": "red"})


def test_check_compatible_names_both_identities():
    identity = make_projector().identity
    identity.check_compatible(make_projector().identity)
    other = make_projector(seed=4, model_fingerprint="def").identity
    with pytest.raises(ProjectorMismatchError) as raised:
        identity.check_compatible(other)
    message = str(raised.value)
    assert "seed" in message
    assert "model_fingerprint" in message
    assert identity.fingerprint() in message
    assert other.fingerprint() in message
    assert "k_in" not in message.split("(")[0]
