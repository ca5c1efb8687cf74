"""Proxy training on the real corpus: checkpoints, trainer state, falling loss, packing."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from automixer_ray.checkpoints import discover_checkpoints, load_model, load_tokenizer
from automixer_ray.proxy import build_model, pack_token_batches, train_causal_lm, train_proxy


def _state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _text_loss(checkpoint: str, text: str) -> float:
    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:128]])  # [1, T]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_proxy_run_checkpoints(proxy_run):
    infos = discover_checkpoints([proxy_run])
    assert [info.step for info in infos] == [50, 100, 150]
    assert [info.name for info in infos] == ["checkpoint-000050", "checkpoint-000100", "checkpoint-000150"]
    for info in infos:
        state = _state(info.path)
        assert state["global_step"] == info.step
        assert state["learning_rate"] > 0
        assert os.path.isfile(os.path.join(info.path, "model.safetensors"))
        assert os.path.isfile(os.path.join(info.path, "tokenizer.json"))
    assert len({info.fingerprint for info in infos}) == 3


def test_proxy_run_loss_decreases(proxy_run, shared_data):
    infos = discover_checkpoints([proxy_run])
    history = _state(infos[-1].path)["log_history"]
    assert len(history) == 150
    first_window = sum(entry["loss"] for entry in history[:10]) / 10
    assert _state(infos[0].path)["loss"] < first_window
    assert _state(infos[-1].path)["loss"] < _state(infos[0].path)["loss"]
    text = (shared_data / "corpus" / "news" / "business" / "001.txt").read_text(encoding="utf-8")
    assert _text_loss(infos[-1].path, text) < _text_loss(infos[0].path, text)


def test_pack_token_batches_keeps_tokens(tokenizer_dir, corpus_texts):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in corpus_texts[:40]]
    eos = tokenizer.eos_token_id
    batches = list(pack_token_batches(documents, batch_size=4, context_length=32, eos_id=eos, seed=3,
                                      buffer_rows=16))
    assert all(batch.shape == (4, 32) for batch in batches)
    assert all(batch.dtype == torch.long for batch in batches)
    stream = [token for document in documents for token in document + [eos]]
    whole_rows = len(stream) // 32
    assert len(batches) == whole_rows // 4
    packed = Counter(tuple(row.tolist()) for batch in batches for row in batch)
    expected = Counter(tuple(stream[i * 32:(i + 1) * 32]) for i in range(whole_rows))
    assert not packed - expected
    again = list(pack_token_batches(documents, batch_size=4, context_length=32, eos_id=eos, seed=3,
                                    buffer_rows=16))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(pack_token_batches(documents, batch_size=4, context_length=32, eos_id=eos, seed=4,
                                    buffer_rows=16))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_build_model_seeded(arch):
    kwargs = dict(arch=arch, vocab_size=300, context_length=32, num_layers=2, hidden_size=32, num_heads=2,
                  pad_token_id=1, eos_token_id=0)
    first, second, third = build_model(**kwargs, seed=5), build_model(**kwargs, seed=5), build_model(**kwargs, seed=6)
    weights = [torch.cat([p.flatten() for p in model.parameters()]) for model in (first, second, third)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    logits = first(input_ids=torch.zeros(2, 8, dtype=torch.long)).logits  # [2, 8, vocab]
    assert logits.shape == (2, 8, 300)


def test_build_model_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads=3"):
        build_model(arch="gpt2", vocab_size=300, context_length=32, num_layers=1, hidden_size=32, num_heads=3,
                    pad_token_id=1, eos_token_id=0, seed=0)


def test_train_causal_lm_llama_saves_final(tmp_path, tiny_llama_dir, corpus_texts):
    tokenizer = load_tokenizer(tiny_llama_dir)
    model = load_model(tiny_llama_dir)
    documents = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in corpus_texts)
    batches = pack_token_batches(documents, batch_size=2, context_length=32, eos_id=tokenizer.eos_token_id, seed=0,
                                 buffer_rows=8)
    calls = []

    def eval_fn(model, step):
        calls.append(step)
        return {"eval_marker": float(step)}

    paths = train_causal_lm(model, tokenizer, batches, steps=6, learning_rate=1e-3, warmup_steps=2, save_every=4,
                            output_dir=str(tmp_path / "run"), seed=0, eval_fn=eval_fn, eval_every=3, progress=False)
    assert [os.path.basename(path) for path in paths] == ["checkpoint-000004", "checkpoint-000006"]
    assert calls == [3, 6]
    assert [info.step for info in discover_checkpoints([str(tmp_path / "run")])] == [4, 6]
    history = _state(paths[-1])["log_history"]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4, 5, 6]
    assert history[2]["eval_marker"] == 3.0
    assert history[0]["learning_rate"] < history[1]["learning_rate"]
    with pytest.raises(FileExistsError, match="already contains checkpoints"):
        train_causal_lm(model, tokenizer, iter([]), steps=1, learning_rate=1e-3, warmup_steps=0, save_every=1,
                        output_dir=str(tmp_path / "run"), seed=0, progress=False)


def test_train_causal_lm_short_stream(tmp_path, tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    model = load_model(tiny_gpt2_dir)
    batches = [torch.randint(0, len(tokenizer) - 2, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    paths = train_causal_lm(model, tokenizer, batches, steps=10, learning_rate=1e-3, warmup_steps=1, save_every=5,
                            output_dir=str(tmp_path / "run"), seed=0, progress=False)
    assert [os.path.basename(path) for path in paths] == ["checkpoint-000003"]
    assert _state(paths[0])["global_step"] == 3


def test_train_proxy_trains_tokenizer(tmp_path, shared_data):
    corpus = shared_data / "corpus"
    output = tmp_path / "proxy"
    paths = train_proxy(corpus_uris=[str(corpus / "wikitext"), str(corpus / "news" / "tech")], output_dir=str(output),
                        steps=4, save_every=2, vocab_size=512, arch="llama", context_length=32, hidden_size=32,
                        batch_size=2, max_chars=200_000, progress=False)
    assert [os.path.basename(path) for path in paths] == ["checkpoint-000002", "checkpoint-000004"]
    assert os.path.isfile(output / "tokenizer" / "tokenizer.json")
    assert len(AutoTokenizer.from_pretrained(str(output / "tokenizer"))) == 512
    infos = discover_checkpoints([str(output)])
    assert [info.step for info in infos] == [2, 4]
