"""Per-sample factored projected gradients in one forward and one backward pass.

For a linear layer with weight W (d_out x d_in), a sample's loss gradient is
G = sum over its tokens tau of delta_tau a_tau^T, where a is the layer input and delta the loss
gradient at the layer output. AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910) scores samples
by projected gradients. This module implements the factored projection

    phi_l = P_out G P_in^T = sum_tau (P_out delta_tau) (P_in a_tau)^T      [k_out, k_in]

flattened row-major, as LoGra does. Forward hooks project the inputs, tensor hooks on the layer
outputs project the output gradients, and an einsum over tokens gives every sample's block at once.
The per-sample losses are summed (not averaged over the batch) before the backward pass, so each
sample's delta is the gradient of its own loss alone. This is exact because a causal LM never mixes
samples of a batch. Models with cross-sample operations (batch norm, capacity-limited MoE
routing) are not supported.

Loss convention: the loss of a sample is the mean token cross-entropy over its target tokens.
``target_mask[b, tau] = 1`` marks token tau as a target, predicted from the logits at tau - 1.
Position 0, padding, and a token whose predecessor is padding are never targets.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automixer_ray.projection import Projector, ProjectorIdentity

logger = logging.getLogger(__name__)


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """Return (d_in, d_out) of an ``nn.Linear`` or transformers ``Conv1D`` (whose weight is [d_in, d_out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, _linear_types()):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer; only nn.Linear and Conv1D can be featurized")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the transformer blocks: children of the outermost ``nn.ModuleList`` of same-class modules."""
    linear_types = _linear_types()
    blocks: list[tuple[str, nn.Module]] = []
    block_lists: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer in block_lists):
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if not any(isinstance(sub, linear_types) for sub in children[0].modules()):
            continue
        block_lists.append(name)
        blocks.extend((f"{name}.{index}", child) for index, child in enumerate(children))
    return blocks


def _forward_order(model: nn.Module, names: list[str]) -> list[str]:
    """Sort ``names`` by the order in which a two-token forward pass first calls each module."""
    modules = dict(model.named_modules())
    called: list[str] = []
    handles = [modules[name].register_forward_hook(lambda *_, n=name: called.append(n)) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    first_call = {name: i for i, name in reversed(list(enumerate(called)))}
    registration = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda n: (first_call.get(n, len(called)), registration[n]))


def find_candidate_layers(model: nn.Module, patterns: Sequence[str] = ()) -> list[str]:
    """Return the Linear/Conv1D layers inside the transformer blocks, in forward order.

    The LM head and the embeddings are never candidates. ``patterns`` are module-name substrings;
    when given, a layer is kept if its name contains any of them.
    """
    linear_types = _linear_types()
    excluded = {id(model.get_output_embeddings()), id(model.get_input_embeddings())}
    names = []
    for block_name, block in find_blocks(model):
        for sub_name, module in block.named_modules():
            if isinstance(module, linear_types) and id(module) not in excluded and sub_name:
                names.append(f"{block_name}.{sub_name}")
    if not names:
        raise ValueError(f"found no Linear/Conv1D layers inside transformer blocks of {type(model).__name__}; "
                         "featurizing needs a model whose blocks sit in an nn.ModuleList")
    if patterns:
        kept = [name for name in names if any(pattern in name for pattern in patterns)]
        if not kept:
            raise ValueError(f"no candidate layer matches projection.layers={list(patterns)}; "
                             f"candidates are {names}")
        names = kept
    return _forward_order(model, names)


def layer_shapes(model: nn.Module, layer_names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Return (d_in, d_out) per layer name, in the given order."""
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of {type(model).__name__}; "
                         "take names from find_candidate_layers(model)")
    return {name: layer_shape(modules[name]) for name in layer_names}


@dataclass(kw_only=True)
class FeatureBatch:
    """Projected gradients of one batch, with which samples are usable and why not."""

    # [B, len(layer_names) * k_out * k_in] float32; rows of invalid samples are zero.
    features: np.ndarray
    # [B] bool
    valid: np.ndarray
    # None for a valid sample, otherwise no_target_tokens, nonfinite_loss,
    # nonfinite_gradient:<layer> or zero_gradient.
    reasons: list[str | None]


def _as_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if tensor.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected [batch, tokens]")
    return tensor.to(device=device, dtype=torch.long)


def _project(x: torch.Tensor, matrix: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Project the last axis of x [B, T, d] with matrix [k, d] in float32; masked tokens become 0."""
    batch, tokens = token_mask.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        projected = x.detach().reshape(batch, tokens, -1).float() @ matrix.T  # [B, T, k]
    # Select with torch.where instead of multiplying by the mask, because NaN * 0 is NaN.
    return torch.where(token_mask[..., None], projected, torch.zeros((), device=x.device))


class Featurizer:
    """Hooks on ``layer_names`` of ``model`` that return each sample's projected gradient.

    The model is put in eval mode (dropout would break exactness). The backward pass starts at
    the block that contains the earliest layer in ``layer_names``, whose incoming hidden state
    becomes a leaf. Parameters do not require grad while featurizing, so earlier blocks build no
    graph and earlier layers receive no gradient. On CUDA the forward pass runs under bf16
    autocast (``autocast=None`` picks it), and all projections and sums are float32.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], projector: Projector,
                 *, autocast: bool | None = None) -> None:
        if not layer_names:
            raise ValueError("layer_names is empty; pass at least one layer from find_candidate_layers(model)")
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"layer_names {list(layer_names)} repeats a layer; name each layer once")
        self.model = model
        self.layer_names = list(layer_names)
        shapes = layer_shapes(model, self.layer_names)
        unknown = [name for name in self.layer_names if name not in projector.layer_shapes]
        if unknown:
            raise ValueError(f"the projector has no matrices for layers {unknown}; build it over these layers")
        for name, shape in shapes.items():
            if projector.layer_shapes[name] != shape:
                raise ValueError(f"layer {name} has (d_in, d_out) = {shape} but the projector was built for "
                                 f"{projector.layer_shapes[name]}; rebuild the projector from this model")
        self.projector = projector.restricted_to(self.layer_names)
        self.device = next(model.parameters()).device
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        self._modules = {name: module for name, module in model.named_modules() if name in shapes}
        self._entry_block = self._find_entry_block()
        if model.training:
            logger.info("putting %s in eval mode for featurizing", type(model).__name__)
            model.eval()

    @property
    def identity(self) -> ProjectorIdentity:
        return self.projector.identity

    @property
    def dim(self) -> int:
        return self.projector.dim

    def _find_entry_block(self) -> nn.Module:
        blocks = find_blocks(self.model)
        first_index = None
        for name in self.layer_names:
            index = next((i for i, (block_name, _) in enumerate(blocks) if name.startswith(block_name + ".")), None)
            if index is None:
                raise ValueError(f"layer {name} is not inside a transformer block; "
                                 "choose layers from find_candidate_layers(model)")
            first_index = index if first_index is None else min(first_index, index)
        return blocks[first_index][1]

    @contextlib.contextmanager
    def _hooks(self, token_mask: torch.Tensor, store: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
        """Install the leaf-making pre-hook and the projection hooks; freeze parameters meanwhile."""
        def make_leaf(_module, args, kwargs):
            if args:
                args = (args[0].detach().requires_grad_(True),) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach().requires_grad_(True))
            return args, kwargs

        def capture(name: str):
            p_in, p_out = self.projector.matrices(name, self.device)

            def forward_hook(_module, inputs, output):
                store["inputs"][name] = _project(inputs[0], p_in, token_mask)  # [B, T, k_in]
                if output.requires_grad:
                    def backward_hook(grad):
                        store["grads"][name] = _project(grad, p_out, token_mask)  # [B, T, k_out]
                    output.register_hook(backward_hook)
            return forward_hook

        flags = [(parameter, parameter.requires_grad) for parameter in self.model.parameters()]
        handles = [self._entry_block.register_forward_pre_hook(make_leaf, with_kwargs=True)]
        handles += [self._modules[name].register_forward_hook(capture(name)) for name in self.layer_names]
        try:
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

    def _per_sample_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         label_mask: torch.Tensor) -> torch.Tensor:
        """Return the mean cross-entropy over each sample's target tokens, [B] float32."""
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False).logits
        logits = logits[:, :-1].float()  # [B, T-1, V]: position tau predicts token tau + 1
        # Zero the logits of non-target positions with torch.where, so that their gradient is exactly 0.
        logits = torch.where(label_mask[..., None], logits, torch.zeros((), device=logits.device))
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                                     reduction="none").view(label_mask.shape)  # [B, T-1]
        token_loss = torch.where(label_mask, token_loss, torch.zeros((), device=logits.device))
        return token_loss.sum(1) / label_mask.sum(1).clamp(min=1)

    def featurize(self, input_ids: Any, attention_mask: Any, target_mask: Any) -> FeatureBatch:
        """Return the projected gradients of a padded batch; every argument is [B, T]."""
        input_ids = _as_tensor(input_ids, "input_ids", self.device)
        attention_mask = _as_tensor(attention_mask, "attention_mask", self.device)
        target_mask = _as_tensor(target_mask, "target_mask", self.device)
        if not input_ids.shape == attention_mask.shape == target_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
                             f"and target_mask {tuple(target_mask.shape)} must have the same shape [B, T]")
        batch, tokens = input_ids.shape
        real = attention_mask.bool()
        label_mask = target_mask[:, 1:].bool() & real[:, 1:] & real[:, :-1]  # [B, T-1]
        has_target = label_mask.any(1)
        store: dict[str, dict[str, torch.Tensor]] = {"inputs": {}, "grads": {}}
        finite = torch.zeros(batch, dtype=torch.bool, device=self.device)
        if tokens >= 2 and bool(has_target.any()):
            with self._hooks(real, store):
                losses = self._per_sample_loss(input_ids, attention_mask, label_mask)
                finite = torch.isfinite(losses).detach() & has_target
                if bool(finite.any()):
                    torch.where(finite, losses, torch.zeros((), device=self.device)).sum().backward()
        return self._collect(store, has_target, finite)

    def _collect(self, store: dict[str, dict[str, torch.Tensor]], has_target: torch.Tensor,
                 finite: torch.Tensor) -> FeatureBatch:
        batch = has_target.shape[0]
        reasons: list[str | None] = [None] * batch
        for b in range(batch):
            if not bool(has_target[b]):
                reasons[b] = "no_target_tokens"
            elif not bool(finite[b]):
                reasons[b] = "nonfinite_loss"
        blocks = []
        for name in self.layer_names:
            grads, inputs = store["grads"].get(name), store["inputs"].get(name)
            if grads is None or inputs is None:
                blocks.append(torch.zeros(batch, self.projector.block_size, device=self.device))
                continue
            block = torch.einsum("btk,btj->bkj", grads, inputs).reshape(batch, -1)  # [B, k_out * k_in]
            for b in torch.nonzero(~torch.isfinite(block).all(1)).flatten().tolist():
                reasons[b] = reasons[b] or f"nonfinite_gradient:{name}"
            blocks.append(block)
        features = torch.cat(blocks, dim=1).detach().cpu().numpy().astype(np.float32, copy=False)
        for b in range(batch):
            if reasons[b] is None and not np.any(features[b]):
                reasons[b] = "zero_gradient"
        valid = np.array([reason is None for reason in reasons], dtype=bool)
        features[~valid] = 0.0
        if not valid.all():
            logger.debug("featurize: %d of %d samples invalid: %s", int((~valid).sum()), batch,
                         sorted({r for r in reasons if r}))
        return FeatureBatch(features=features, valid=valid, reasons=reasons)


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int, *,
              side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest one; return (input_ids, attention_mask), both [B, T] int64."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} is invalid; use 'right' or 'left'")
    lengths = [len(tokens) for tokens in token_lists]
    width = max(lengths, default=0) or 1
    input_ids = torch.full((len(token_lists), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if not len(tokens):
            continue
        columns = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
        input_ids[row, columns] = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def encode_task_examples(tokenizer, examples: Sequence[Any], max_length: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode multiple-choice examples with the gold continuation as the only target.

    Each example is a ``tasks.Example``. Its gold (context, continuation) pair is tokenized as
    ``evaluation.encode_pair`` does for checkpoint selection (the lm-evaluation-harness split), so
    that task gradients see the same tokens that were scored. Sequences longer than ``max_length``
    lose tokens from the left. Returns (input_ids, attention_mask, target_mask), right-padded,
    each [B, T] int64.
    """
    from automixer_ray.evaluation import encode_pair

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with checkpoints.load_tokenizer")
    token_lists, target_counts = [], []
    for example in examples:
        context, continuation = example.gold_pair
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        tokens = (list(context_ids) + list(continuation_ids))[-max_length:]
        token_lists.append(tokens)
        target_counts.append(min(len(continuation_ids), len(tokens)))
    input_ids, attention_mask = pad_batch(token_lists, tokenizer.pad_token_id, side="right")
    target_mask = torch.zeros_like(attention_mask)
    for row, (tokens, num_targets) in enumerate(zip(token_lists, target_counts)):
        target_mask[row, len(tokens) - num_targets:len(tokens)] = 1
    return input_ids, attention_mask, target_mask
