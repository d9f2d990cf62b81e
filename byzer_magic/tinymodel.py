"""Build a tiny random Llama, offline and deterministically, for tests and tutorials.

It writes the same weights twice: as Hugging Face files (config.json,
model.safetensors, tokenizer.json with a chat template) and as an f32 GGUF
that llama.cpp loads. The tokenizer is a byte-level BPE trained here on a
generated corpus, so nothing comes from a hub. The shape (hidden 128, 2 heads
of 64) is one vLLM's CPU attention accepts.

    python -m byzer_magic.tinymodel OUT_DIR [--seed 0] [--encoder]
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
_WORDS = (
    "ray serve model deploy worker cluster chat answer question token stream notebook cell magic "
    "hello there what is the a an of to and in on for with from by as it this that how why when "
    "llama tiny random test vector engine server client request reply fast slow good new old one "
    "two three four five many some all none data python jupyter widget card scale stop start run "
    "gpu cpu memory time second minute batch queue replica actor node head task job result error "
    "you we they he she i am are was were be been do does did can will would should could may "
    "say tell give make take find know think see look want use work call try ask need feel become"
).split()


@dataclass(frozen=True)
class TinyConfig:
    """The model's shape; every field goes into the cache key."""

    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 128
    num_heads: int = 2
    num_kv_heads: int = 2
    num_layers: int = 2
    intermediate_size: int = 256
    context_length: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TinyModel:
    """Where a built model lives: `hf_dir` for transformers/vLLM, `gguf` for llama.cpp."""

    hf_dir: Path
    gguf: Path
    config: TinyConfig


def build(out_dir: str | Path, config: TinyConfig = TinyConfig()) -> TinyModel:
    """Build the model into out_dir, or return the one already there with this config."""
    out = Path(out_dir)
    model = TinyModel(out / "hf", out / "tiny-llama-f32.gguf", config)
    stamp = out / "built.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == config.key() and model.gguf.exists():
        return model
    model.hf_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(config)
    weights = _weights(config)
    _write_hf(model.hf_dir, config, tokenizer, weights)
    _write_gguf(model.gguf, config, tokenizer, weights)
    stamp.write_text(json.dumps({"key": config.key(), "config": asdict(config)}))
    return model


def build_encoder(out_dir: str | Path, config: TinyConfig = TinyConfig(hidden_size=64, num_layers=2)) -> Path:
    """A tiny random BERT-style encoder with the same kind of tokenizer, for embedding tests.

    Written with transformers itself (torch, seeded), since only the
    transformers backend embeds; returns the model directory.
    """
    out = Path(out_dir)
    stamp = out / "built.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == config.key():
        return out
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(config, [PAD, *SPECIAL_TOKENS])
    torch.manual_seed(config.seed)
    model = BertModel(
        BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.context_length,
            pad_token_id=tokenizer.token_to_id(PAD),
        ),
    )
    model.save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=config.context_length
    ).save_pretrained(out)
    stamp.write_text(json.dumps({"key": config.key(), "config": asdict(config)}))
    return out


def _corpus(seed: int, sentences: int = 3000) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(sentences):
        words = rng.choice(_WORDS, size=int(rng.integers(3, 14)))
        line = " ".join(words).capitalize() + str(rng.choice([".", "?", "!", ","]))
        lines.append(line)
    return lines


def _train_tokenizer(config: TinyConfig, specials: list[str] = SPECIAL_TOKENS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(config.seed), trainer=trainer)
    return tokenizer


def _weights(config: TinyConfig) -> dict[str, "object"]:
    """HF-named float32 weights; scaled so greedy choices are clear, not near ties."""
    import numpy as np

    rng = np.random.default_rng(config.seed + 1)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_kv_heads * config.head_dim

    def linear(out_dim: int, in_dim: int, gain: float = 1.0):
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = linear(h, h)
        w[p + "self_attn.k_proj.weight"] = linear(kv, h)
        w[p + "self_attn.v_proj.weight"] = linear(kv, h)
        w[p + "self_attn.o_proj.weight"] = linear(h, h)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "mlp.gate_proj.weight"] = linear(f, h)
        w[p + "mlp.up_proj.weight"] = linear(f, h)
        w[p + "mlp.down_proj.weight"] = linear(h, f)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = linear(v, h, gain=4.0)
    return w


def _write_hf(path: Path, config: TinyConfig, tokenizer, weights: dict) -> None:
    from safetensors.numpy import save_file

    vocab = tokenizer.get_vocab()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.num_layers,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "torch_dtype": "float32",
    }, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "do_sample": False}))
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": config.context_length,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _rope_permute(weight, n_head: int):
    """HF's rotate-half q/k layout -> GGML's interleaved one (as llama.cpp's converter does)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_gguf(path: Path, config: TinyConfig, tokenizer, weights: dict) -> None:
    import gguf

    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [
        gguf.TokenType.CONTROL if tok in SPECIAL_TOKENS else gguf.TokenType.NORMAL for tok in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("byzer-magic tiny llama")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[BOS])
    writer.add_eos_token_id(vocab[EOS])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_layers):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            suffix = ".weight"
            tensor = weights[f"model.layers.{i}.{hf_name}{suffix}"]
            if hf_name == "self_attn.q_proj":
                tensor = _rope_permute(tensor, config.num_heads)
            elif hf_name == "self_attn.k_proj":
                tensor = _rope_permute(tensor, config.num_kv_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}{suffix}", tensor)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m byzer_magic.tinymodel", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", action="store_true", help="build the tiny embedding model instead")
    args = parser.parse_args(argv)
    if args.encoder:
        print(f"encoder: {build_encoder(args.out_dir, TinyConfig(seed=args.seed, hidden_size=64))}")
        return
    model = build(args.out_dir, TinyConfig(seed=args.seed))
    print(f"hf: {model.hf_dir}\ngguf: {model.gguf}")


if __name__ == "__main__":
    main()
