"""LLM data files, templates and label masking."""

import json

import pytest

from config import UserError, build_config
from data_loading import Example, load_data_file
from data_processing import (
    IGNORE_INDEX,
    Collator,
    Encoder,
    completion_text,
    encode_all,
    fingerprint,
    prompt_text,
    strip_thinking,
)


def _cfg(**kw):
    return build_config(kw, "test")


def _tok(models, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models(arch))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("content,fragment", [
    ('[{"text": "a", "target": "b"},\n {"text": "c" "target": "d"}]', "invalid JSON at line 2, column"),
    ('{"text": "a", "target": "b"}', "expected a JSON array"),
    ('[]', "no entries"),
    ('[{"text": "a", "target": "b"}, "oops"]', "entry 1 is a str"),
    ('[{"text": "a"}]', 'entry 0 has no "target"'),
    ('[{"text": "a", "target": "  "}]', 'entry 0: "target" is empty'),
    ('[{"text": 5, "target": "b"}]', 'entry 0: "text" must be a string, got int'),
])
def test_bad_qa_files(tmp_path, content, fragment):
    path = tmp_path / "train.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_data_file(path)
    assert fragment in str(e.value) and str(path) in str(e.value)


def test_utf8_bom_is_accepted(tmp_path):
    """Windows editors often save UTF-8 with a byte-order mark."""
    path = tmp_path / "train.json"
    path.write_bytes('[{"text": "问", "target": "答"}]'.encode("utf-8-sig"))
    assert load_data_file(path)[0].target == "答"


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data_file(tmp_path / "train.json")


def test_chat_template_masks_prompt_and_has_no_think_in_answer(models):
    tok = _tok(models, "qwen3")
    cfg = _cfg(max_length=512)
    ex = Example("如何保持睡眠？", "早点睡觉。")
    enc = Encoder(tok, cfg)(ex)
    prompt = prompt_text(tok, ex, None)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert answer == "早点睡觉。<|im_end|>"          # the answer and the end-of-turn, nothing else
    assert "<think>" in prompt and "<think>" not in answer  # thinking disabled: empty block in the prompt only
    assert tok.decode(enc["input_ids"]) == prompt + answer


def test_plain_format_keeps_the_tokenizers_bos(models):
    tok = _tok(models, "opt")                      # OPT's tokenizer starts every text with a BOS
    enc = Encoder(tok, _cfg())(Example("问题", "回答"))
    assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][0] == IGNORE_INDEX
    assert enc["input_ids"].count(tok.bos_token_id) == 2  # BOS, then the answer's EOS (same id); no BOS mid-text


def test_plain_format_without_chat_template(models):
    tok = _tok(models, "gpt2")
    ex = Example("问题", "回答")
    assert tok.chat_template is None
    assert prompt_text(tok, ex, None) == "问题\n"
    assert completion_text(tok, ex, None, "问题\n") == "回答" + tok.eos_token
    enc = Encoder(tok, _cfg())(ex)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "回答<|endoftext|>"


def test_too_long_samples_are_cut_and_counted(models, caplog):
    tok = _tok(models, "qwen3")
    limit = len(tok(prompt_text(tok, Example("短", ""), None), add_special_tokens=False)["input_ids"]) + 4
    cfg = _cfg(max_length=limit)
    enc = Encoder(tok, cfg)
    examples = [Example("短", "好"), Example("短", "很长的回答" * 20), Example("很长的问题" * 30, "好")]
    out = encode_all(enc, examples, None, "train")
    assert len(out) == 2 and all(len(x["input_ids"]) <= limit for x in out)
    assert f"2 of 3 samples are longer than max_length={limit}: 1 answers cut" in caplog.text
    assert "1 dropped" in caplog.text


def test_collator_pads_right_with_ignore_labels(models):
    tok = _tok(models, "qwen3")
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = Collator(tok)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_padding_does_not_change_the_loss(models):
    """Dynamic padding vs padding to max_length: same per-token loss (answer tokens only)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tok(models, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(models("qwen3"), dtype=torch.float32).eval()
    enc = Encoder(tok, _cfg(max_length=128))
    feats = [enc(Example("问题一", "回答很短")), enc(Example("另一个更长一些的问题", "回答也更长一些，有好几个字"))]
    with torch.no_grad():
        dyn = model(**Collator(tok)(feats)).loss
        full = model(**Collator(tok, pad_to_multiple_of=128)(feats)).loss
        grouped = sum(model(**Collator(tok)([f])).loss * (sum(t != -100 for t in f["labels"][1:]))
                      for f in feats) / sum(sum(t != -100 for t in f["labels"][1:]) for f in feats)
    assert torch.allclose(dyn, full, atol=1e-5)
    assert torch.allclose(dyn, grouped, atol=1e-5)


def test_tokenisation_cache_invalidated_by_data_and_tokenizer(models, tmp_path):
    tok_q, tok_g = _tok(models, "qwen3"), _tok(models, "gpt2")
    cfg = _cfg()
    a = [Example("问", "答")]
    b = [Example("问", "答!")]
    assert fingerprint(tok_q, a, cfg) == fingerprint(tok_q, [Example("问", "答")], cfg)
    assert fingerprint(tok_q, a, cfg) != fingerprint(tok_q, b, cfg)
    assert fingerprint(tok_q, a, cfg) != fingerprint(tok_g, a, cfg)
    assert fingerprint(tok_q, a, cfg) != fingerprint(tok_q, a, _cfg(max_length=64))
    enc = Encoder(tok_q, cfg)
    first = encode_all(enc, a, tmp_path, "train")
    assert len(list(tmp_path.glob("train-*.json"))) == 1
    encode_all(enc, b, tmp_path, "train")  # new data: new cache file, the stale one removed
    files = list(tmp_path.glob("train-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) != first


def test_strip_thinking():
    assert strip_thinking("<think>\nhmm\n</think>\n\n答案") == "答案"


def test_chat_template_refusal_is_a_user_error(models):
    tok = _tok(models, "qwen3")
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}" \
                        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="System role not supported.*unset system_prompt"):
        prompt_text(tok, Example("问", "答"), "be brief")
    assert prompt_text(tok, Example("问", "答"), None) == "问"
