"""GGUF files written from a transformers Llama folder, as llama.cpp's converter writes them.

For tests of GGUF checkpoints as base models (steps/gguf.py) without downloading one: the
bundled stories260K written with the `gguf` package's own writer, its tensors F32 or Q8_0,
its SentencePiece vocabulary (pieces, scores, types from tokenizer.model) as
`tokenizer.ggml.*` metadata: what transformers reads back for a llama GGUF
(transformers/modeling_gguf_pytorch_utils.py, integrations/gguf/gguf_tokenizer_mapping.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# transformers' leaf names → llama.cpp's (gguf-py's tensor_mapping for MODEL_ARCH.LLAMA)
LAYER_LEAVES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
Q8_0_BLOCK = 32  # values per Q8_0 block: a row must be a whole number of blocks


def gguf_tensor_name(name: str) -> str:
    """model.layers.3.mlp.up_proj.weight → blk.3.ffn_up.weight."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    _, _, layer, *leaf, kind = name.split(".")
    return f"blk.{layer}.{LAYER_LEAVES['.'.join(leaf)]}.{kind}"


def rope_permuted(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute), which
    transformers undoes on load (LlamaTensorProcessor._reverse_permute_weights)."""
    rows = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, rows, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(
    model_dir: Path, path: Path, *, quantization: str = "F32", architecture: str = "llama"
) -> Path:
    """model_dir (a Llama folder with tokenizer.model) as a GGUF at path. quantization:
    F32, or Q8_0 for every 2-D tensor whose rows are whole Q8_0 blocks (the others stay
    F32, as llama.cpp leaves them). architecture: what general.architecture says (the
    hyperparameter keys follow it)."""
    if quantization not in ("F32", "Q8_0"):
        raise ValueError(f"quantization {quantization!r}: F32 or Q8_0")
    config = json.loads((model_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), architecture)
    _write_hyperparameters(writer, config)
    _write_vocabulary(writer, model_dir / "tokenizer.model", config)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, weights in load_file(model_dir / "model.safetensors").items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue  # no output.weight: transformers ties it to the embeddings
        weights = weights.astype(np.float32)
        if ".q_proj." in name:
            weights = rope_permuted(weights, heads)
        elif ".k_proj." in name:
            weights = rope_permuted(weights, kv_heads)
        _add_tensor(writer, gguf_tensor_name(name), weights, quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_name("stories260K")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def _write_vocabulary(writer: gguf.GGUFWriter, spm_path: Path, config: dict) -> None:
    """The SentencePiece model's pieces as llama.cpp writes them (tokenizer.ggml.model
    'llama': no merges, transformers derives them from the scores)."""
    from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_model

    spm = sentencepiece_model.ModelProto()
    spm.ParseFromString(spm_path.read_bytes())
    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece.piece for piece in spm.pieces])
    writer.add_token_scores([piece.score for piece in spm.pieces])
    writer.add_token_types([piece.type for piece in spm.pieces])  # SentencePiece's = ggml's
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(spm.trainer_spec.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_tensor(writer: gguf.GGUFWriter, name: str, weights: np.ndarray, quantization: str) -> None:
    if quantization == "F32" or weights.ndim != 2 or weights.shape[-1] % Q8_0_BLOCK:
        writer.add_tensor(name, weights)
        return
    kind = gguf.GGMLQuantizationType.Q8_0
    packed = gguf.quants.quantize(weights, kind)
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
