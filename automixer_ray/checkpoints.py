"""Find, fingerprint and safely load the checkpoints of one training run.

A checkpoint is a Hugging Face model folder: ``config.json``, weights as safetensors (pickled
``.bin``/``.pt`` only when allowed), tokenizer files, and optionally ``trainer_state.json`` with the
step. All checkpoints of a job must share one architecture and one tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import fsspec

logger = logging.getLogger(__name__)

SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_STEP_PATTERN = re.compile(r"(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, unsafe to load or inconsistent with the others."""


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One checkpoint of the run: name, local path, training step and content fingerprint."""

    name: str
    path: str
    step: int
    fingerprint: str

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "step": self.step, "fingerprint": self.fingerprint}


def _local_path(uri: str) -> str:
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol not in (None, "file", "local"):
        # TODO: stage remote checkpoints to a local cache before loading.
        raise CheckpointError(f"checkpoint {uri} is not on a local or mounted file system; "
                              "copy it to local disk or a shared mount and pass that path")
    return os.path.abspath(path)


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _read_step(path: str) -> int:
    state_path = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        step = state.get("global_step", state.get("step"))
        if isinstance(step, int):
            return step
    match = _STEP_PATTERN.search(os.path.basename(path.rstrip("/")))
    if match:
        return int(match.group(1))
    raise CheckpointError(f"checkpoint {path} has no step: add trainer_state.json with global_step "
                          "or end the folder name in the step number (checkpoint-000020)")


def fingerprint_checkpoint(path: str) -> str:
    """Hash the config and weight files (names, sizes and contents) into a 16-hex-digit id."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt")):
            digest.update(name.encode())
            with open(os.path.join(path, name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_checkpoint_files(path: str, *, allow_pickle: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``path`` has a config, loadable weights and a tokenizer."""
    if not _is_checkpoint_dir(path):
        raise CheckpointError(f"checkpoint {path} has no config.json; point at a Hugging Face model folder")
    names = set(os.listdir(path))
    has_safe = any(name in names for name in SAFE_WEIGHT_FILES) or any(n.endswith(".safetensors") for n in names)
    has_pickle = any(name in names for name in PICKLE_WEIGHT_FILES)
    if not has_safe and has_pickle and not allow_pickle:
        raise CheckpointError(
            f"checkpoint {path} has only pickled weights ({', '.join(sorted(names & set(PICKLE_WEIGHT_FILES)))}), "
            "which can run code when loaded; convert them to safetensors, or set "
            "checkpoints.allow_pickle: true to load them with torch.load(weights_only=True)")
    bare_state_dicts = sorted(name for name in names if name.endswith((".pt", ".pth")))
    if not has_safe and not has_pickle and bare_state_dicts:
        raise CheckpointError(f"checkpoint {path} has weights only in {', '.join(bare_state_dicts)}, which "
                              "from_pretrained cannot load; load them into the model and save it with "
                              "save_pretrained(path, safe_serialization=True)")
    if not has_safe and not has_pickle:
        raise CheckpointError(f"checkpoint {path} has no weights (model.safetensors); "
                              "save the model with save_pretrained(safe_serialization=True)")
    if not any(name in names for name in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {path} has no tokenizer files (tokenizer.json); "
                              "save the tokenizer beside the weights with tokenizer.save_pretrained")


def discover_checkpoints(uris: list[str], *, allow_pickle: bool = False) -> list[CheckpointInfo]:
    """Expand checkpoint folders and run folders into checkpoints sorted by step.

    A URI that is itself a model folder is one checkpoint; otherwise its subfolders that are model
    folders (``checkpoint-000020/`` and so on) are the checkpoints.
    """
    paths: list[str] = []
    for uri in uris:
        path = _local_path(uri)
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint folder {uri} not found")
        if _is_checkpoint_dir(path):
            paths.append(path)
            continue
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if _is_checkpoint_dir(os.path.join(path, n)))
        if not found:
            raise CheckpointError(f"{uri} contains no checkpoints (subfolders with config.json); "
                                  "pass a run's output folder or a list of checkpoint folders")
        paths.extend(found)
    infos = []
    for path in paths:
        check_checkpoint_files(path, allow_pickle=allow_pickle)
        infos.append(CheckpointInfo(name=os.path.basename(path.rstrip("/")), path=path,
                                    step=_read_step(path), fingerprint=fingerprint_checkpoint(path)))
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"checkpoint names repeat ({names}); give each checkpoint folder a distinct name")
    infos.sort(key=lambda info: (info.step, info.name))
    _check_same_run(infos)
    logger.info("found %d checkpoints: %s", len(infos), ", ".join(f"{i.name} (step {i.step})" for i in infos))
    return infos


def _architecture_signature(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    keys = ("model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer")
    return {key: config.get(key) for key in keys}


def _tokenizer_signature(path: str) -> Optional[str]:
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        return None
    with open(tokenizer_json, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


def _check_same_run(infos: list[CheckpointInfo]) -> None:
    if not infos:
        return
    first = infos[0]
    arch, tok = _architecture_signature(first.path), _tokenizer_signature(first.path)
    for info in infos[1:]:
        other_arch = _architecture_signature(info.path)
        if other_arch != arch:
            raise CheckpointError(f"checkpoints {first.name} and {info.name} have different architectures "
                                  f"({arch} vs {other_arch}); use checkpoints of one training run")
        if _tokenizer_signature(info.path) != tok:
            raise CheckpointError(f"checkpoints {first.name} and {info.name} have different tokenizers; "
                                  "use checkpoints of one training run")


def remote_code_files(path: str) -> dict[str, str]:
    """Return the ``auto_map`` entries of a checkpoint's config.json and tokenizer_config.json.

    Each entry names a Python class that transformers would import from the checkpoint folder or
    the Hub, so a non-empty result means loading runs code that ships with the checkpoint.
    """
    found: dict[str, str] = {}
    for name in ("config.json", "tokenizer_config.json"):
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            continue
        with open(file_path, encoding="utf-8") as handle:
            auto_map = json.load(handle).get("auto_map") or {}
        if isinstance(auto_map, dict):
            found.update({f"{name}:{key}": str(value) for key, value in auto_map.items()})
    return found


def check_remote_code(path: str, *, trust_remote_code: bool) -> None:
    """Raise :class:`CheckpointError` if the checkpoint needs its own Python code and that is not allowed."""
    needed = remote_code_files(path)
    if needed and not trust_remote_code:
        raise CheckpointError(
            f"checkpoint {path} needs custom code to load (auto_map: {needed}), and checkpoints.trust_remote_code "
            "is off; read that code and set checkpoints.trust_remote_code: true only if you trust it, or "
            "save the model with a built-in transformers architecture")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """Load a checkpoint's tokenizer; one without a pad token pads with eos (embeddings never resized)."""
    from transformers import AutoTokenizer

    check_remote_code(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CheckpointError(f"tokenizer in {path} has neither a pad nor an eos token; add one and save it again")
        logger.warning("tokenizer in %s has no pad token; padding with eos (%r)", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, device: str = "cpu"):
    """Load a checkpoint's causal LM in float32, in eval mode, refusing pickled weights unless allowed.

    Allowed pickled weights load through ``torch.load(weights_only=True)``, whose unpickler accepts
    only tensors and plain containers, so a pickle that names any other callable fails to load.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_checkpoint_files(path, allow_pickle=allow_pickle)
    check_remote_code(path, trust_remote_code=trust_remote_code)
    names = set(os.listdir(path))
    use_safetensors = any(n.endswith(".safetensors") or n in SAFE_WEIGHT_FILES for n in names)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        use_safetensors=use_safetensors,
        # transformers (5.x) passes this on to torch.load for .bin files, and it is also the default.
        weights_only=True,
        trust_remote_code=trust_remote_code,
    )
    model.to(device)
    model.eval()
    return model
