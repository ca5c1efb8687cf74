"""Checkpoint discovery and safe loading on real saved models."""

import json
import os
import shutil

import pytest
import torch

from automixer_ray.checkpoints import (
    CheckpointError,
    discover_checkpoints,
    fingerprint_checkpoint,
    load_model,
    load_tokenizer,
)


def _copy_run(source: str, run_dir, steps: list[int]) -> list[str]:
    paths = []
    for step in steps:
        target = run_dir / f"checkpoint-{step:06d}"
        shutil.copytree(source, target)
        (target / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        paths.append(str(target))
    return paths


def test_discover_run_folder_sorted_by_step(tmp_path, tiny_gpt2_dir):
    _copy_run(tiny_gpt2_dir, tmp_path, [20, 5, 10])
    infos = discover_checkpoints([str(tmp_path)])
    assert [info.step for info in infos] == [5, 10, 20]
    assert [info.name for info in infos] == ["checkpoint-000005", "checkpoint-000010", "checkpoint-000020"]
    assert len(infos[0].fingerprint) == 16


def test_fingerprint_changes_with_weights(tmp_path, tiny_gpt2_dir):
    path = _copy_run(tiny_gpt2_dir, tmp_path, [1])[0]
    before = fingerprint_checkpoint(path)
    model = load_model(path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(path)
    assert fingerprint_checkpoint(path) != before


def test_pickle_weights_rejected_unless_allowed(tmp_path, tiny_gpt2_dir):
    path = tmp_path / "checkpoint-000001"
    shutil.copytree(tiny_gpt2_dir, path)
    model = load_model(str(path))
    os.remove(path / "model.safetensors")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights") as error:
        discover_checkpoints([str(path)])
    assert "allow_pickle" in str(error.value)
    loaded = load_model(str(path), allow_pickle=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_missing_weights_or_tokenizer_rejected(tmp_path, tiny_gpt2_dir):
    no_weights = tmp_path / "a" / "checkpoint-000001"
    shutil.copytree(tiny_gpt2_dir, no_weights)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no weights"):
        discover_checkpoints([str(no_weights)])
    no_tokenizer = tmp_path / "b" / "checkpoint-000001"
    shutil.copytree(tiny_gpt2_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(no_tokenizer / name)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        discover_checkpoints([str(no_tokenizer)])


def test_bare_state_dict_rejected_naming_file(tmp_path, tiny_gpt2_dir):
    path = tmp_path / "checkpoint-000001"
    shutil.copytree(tiny_gpt2_dir, path)
    torch.save(load_model(str(path)).state_dict(), path / "model.pt")
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights only in model\.pt") as error:
        discover_checkpoints([str(path)], allow_pickle=True)
    assert "save_pretrained" in str(error.value)


def test_mixed_architectures_rejected(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    shutil.copytree(tiny_gpt2_dir, tmp_path / "checkpoint-000001")
    shutil.copytree(tiny_llama_dir, tmp_path / "checkpoint-000002")
    with pytest.raises(CheckpointError, match="different architectures"):
        discover_checkpoints([str(tmp_path)])


def test_empty_run_folder_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="contains no checkpoints"):
        discover_checkpoints([str(tmp_path)])
    with pytest.raises(CheckpointError, match="not found"):
        discover_checkpoints([str(tmp_path / "missing")])


def test_tokenizer_without_pad_uses_eos(tmp_path, tiny_gpt2_dir):
    path = tmp_path / "checkpoint-000001"
    shutil.copytree(tiny_gpt2_dir, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    special_path = path / "special_tokens_map.json"
    if special_path.exists():
        special = json.loads(special_path.read_text())
        special.pop("pad_token", None)
        special_path.write_text(json.dumps(special))
    tokenizer = load_tokenizer(str(path))
    model = load_model(str(path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
