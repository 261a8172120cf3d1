"""Build tiny random-initialised models in Hugging Face format, for the offline demo and the tests.

Used by:
    python main.py --task train --config configs/demo_llm.yaml   (builds ./models/tiny-qwen3 when absent)
    python main.py --task train --config configs/demo_vlm.yaml   (builds ./models/tiny-qwen3-vl when absent)
    python tiny_models.py qwen3 ./models/tiny-qwen3              (by hand)
    tests/conftest.py                                            (qwen3, gpt2, opt, qwen3_vl)

The weights are random: these models only prove that the pipeline (template, masking, LoRA, generation)
works end to end. They are saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path that a real checkpoint takes. The tokenizer is a byte-level BPE trained on the
texts given (the shipped sample data), so any input text can be encoded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ARCHITECTURES = ("qwen3", "gpt2", "opt", "qwen3_vl")

# A compact chat template in the Qwen3 format: `<|im_start|>role\n...<|im_end|>\n`, with images as
# `<|vision_start|><|image_pad|><|vision_end|>` and an empty think block when thinking is disabled,
# exactly where Qwen3's own template puts it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and loop.last and enable_thinking is defined "
    "and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def default_corpus() -> list[str]:
    """Texts from the shipped sample data (LLM answers and VLM label values), plus ASCII basics."""
    root = Path(__file__).resolve().parent / "data"
    texts: list[str] = []
    for name in ("train.json", "validation.json"):
        path = root / "llm" / name
        if path.is_file():
            for item in json.loads(path.read_text(encoding="utf-8")):
                texts += [str(item.get("text", "")), str(item.get("target", ""))]
    for path in (root / "vlm" / "label_map.json", root / "vlm" / "prompt.json"):
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    texts.append('{"status": "No Leakage", "sub_type": "Normal", "is_night_mode": false, "confidence": 1.0}')
    texts.append("The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?()[]{}<>\"'")
    return texts


def build_tokenizer(corpus: list[str], special: list[str], vocab_size: int = 1200):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build(arch: str, path: str | Path, corpus: list[str] | None = None, hidden: int = 128, layers: int = 2,
          tokenizer_from: str | Path | None = None) -> Path:
    """Build a tiny `arch` model with random weights and save model + tokenizer/processor to `path`.

    `tokenizer_from`: a real checkpoint whose tokenizer to reuse (with the chat and vision tokens added) instead
    of training one, for tools that only accept tokenizers they know (llama.cpp's GGUF converter)."""
    import torch
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    path = Path(path)
    torch.manual_seed(0)
    corpus = corpus if corpus is not None else default_corpus()
    chat = arch in ("qwen3", "qwen3_vl")
    special = CHAT_TOKENS + (VISION_TOKENS if arch == "qwen3_vl" else [])
    if tokenizer_from is not None:
        tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.add_special_tokens({"additional_special_tokens": special if chat else ["<|endoftext|>"]})
    else:
        tokenizer = build_tokenizer(corpus, special if chat else ["<|endoftext|>"])
    vocab = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>" if chat else "<|endoftext|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if chat:
        tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
        tokenizer.chat_template = CHAT_TEMPLATE
    else:
        tokenizer.eos_token = tokenizer.bos_token = tokenizer.pad_token = "<|endoftext|>"
    if arch == "opt":  # like facebook/opt-*: the tokenizer puts a BOS before every text
        from tokenizers.processors import TemplateProcessing

        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", pad_id)])
    heads = max(2, hidden // 32)
    common = dict(vocab_size=vocab, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)

    if arch == "qwen3":
        config = tf.Qwen3Config(
            hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
            max_position_embeddings=2048, tie_word_embeddings=True, **common,
        )
        model = tf.Qwen3ForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, **common)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "opt":
        config = tf.OPTConfig(
            hidden_size=hidden, ffn_dim=hidden * 4, num_hidden_layers=layers, num_attention_heads=heads,
            word_embed_proj_dim=hidden, max_position_embeddings=1024, **common,
        )
        model = tf.OPTForCausalLM(config)
    else:
        model, tokenizer = _build_qwen3_vl(tf, tokenizer, hidden, layers, heads, common)

    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("built tiny random-initialised %s model (%d parameters) at %s",
                arch, sum(p.numel() for p in model.parameters()), path)
    return path


def _build_qwen3_vl(tf, tokenizer, hidden, layers, heads, common):
    """Qwen3-VL needs a processor holding an image processor, a video processor and the tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text_config = dict(
        vocab_size=common["vocab_size"], hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        head_dim=hidden // heads, max_position_embeddings=4096, pad_token_id=common["pad_token_id"],
        eos_token_id=common["eos_token_id"], bos_token_id=common["bos_token_id"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [4, 6, 6], "mrope_interleaved": True},
    )
    vision_config = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=256,
        deepstack_visual_indexes=[1],
    )
    config = tf.Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    model = tf.Qwen3VLForConditionalGeneration(config)
    size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = tf.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny random-initialised model (offline demo/tests).")
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("path")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokenizer_from", help="reuse this checkpoint's tokenizer instead of training one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    build(args.arch, args.path, hidden=args.hidden, layers=args.layers, tokenizer_from=args.tokenizer_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
