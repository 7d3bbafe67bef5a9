"""Parts shared by the tiny pipelines: a character-level CLIP tokenizer, a toy CLIP text config, a toy VAE.

No file or network is needed: the tokenizer is a character-level CLIP BPE (the 256 byte symbols, their ``</w>``
forms, two special tokens, no merges).
"""

from __future__ import annotations

from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (as in OpenAI's simple_tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def tiny_clip_tokenizer() -> Any:
    """Character-level ``CLIPTokenizer`` (514 tokens, max length 77)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_text_config(tokenizer: Any) -> Any:
    """``CLIPTextConfig`` of the tiny text encoders: hidden size 32, 2 layers, projection 32."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def tiny_vae(sample_size: int, **overrides: Any) -> Any:
    """The tiny ``AutoencoderKL`` (VAE factor 8, 4 latent channels) for ``sample_size`` latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=8 * sample_size, **overrides)


def tiny_t5_tokenizer() -> Any:
    """A byte-level ``T5TokenizerFast`` built without any file: a Unigram model over the 256 byte symbols (CLIP's
    byte -> unicode map) plus ``<pad>``, ``</s>``, ``<unk>`` and ``▁``, with T5's Metaspace pre-tokenizer and an
    ``</s>`` appended to every sequence; ``save_pretrained`` / ``from_pretrained`` round-trip it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    pieces = [(s, 0.0) for s in specials] + [("▁", -1.0)]
    pieces += [(symbol, -2.0) for symbol in _bytes_to_unicode().values() if symbol != "▁"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def tiny_t5_config(tokenizer: Any, d_model: int = 32) -> Any:
    """``T5Config`` of the tiny T5 encoders: ``d_model`` wide, 2 layers, 4 heads of 8."""
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id)


#: the chat template of the tiny LLM tokenizers: Qwen's ChatML layout (``enable_thinking`` and other template
#: arguments are accepted and ignored)
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` built without any file (the 256 byte symbols, no merges, Qwen's
    ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` specials, a ChatML chat template), for tiny LLM text encoders;
    ``save_pretrained`` / ``from_pretrained`` round-trip it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], model_max_length=512)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
