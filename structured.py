"""VLM answers that are valid by construction, with a confidence from the model's own probabilities.

    python main.py --task evaluate --model_type vlm            constrained answers, field confidences, calibration
    python main.py --task inference --model_type vlm           the same for each image
    python main.py --task evaluate ... --constrained_decoding false --report_unconstrained true

The JSON schema comes from label_map.json: one property per position (an enum of its map's values, with their
JSON types), then the `defaults` keys typed by their default value, in the order training writes them.
Generation is constrained to it with xgrammar (chosen by measurement: bench/bench_constrained.py), applied by
generation.GrammarProcessor. A field's confidence is the model's probability of the value it chose, normalised
over the values the field allows: every allowed value is scored, by teacher forcing, from the point where the
candidates diverge.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import torch

logger = logging.getLogger(__name__)

_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def _json_type(value) -> str:
    return next(name for kind, name in _JSON_TYPES if isinstance(value, kind))


def label_schema(label_map: dict) -> dict:
    props, required = {}, []
    for pos in label_map["positions"]:
        # deduplicated by their JSON text: true and 1 are different values here
        texts = dict.fromkeys(json.dumps(v) for v in pos["map"].values())
        props[pos["field"]] = {"enum": [json.loads(t) for t in texts]}
        required.append(pos["field"])
    for key, value in label_map.get("defaults", {}).items():
        if key not in props:
            props[key] = {"type": _json_type(value)}
            if isinstance(value, str):  # bounded, so an unsure model cannot write one string forever
                props[key]["maxLength"] = max(16, 2 * len(value))
            required.append(key)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def parse_json(text: str) -> dict | None:
    """The first JSON object in `text`, tolerating code fences and words around it; None if there is none."""
    text = re.sub(r"```(?:json)?", "", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def json_span(text: str) -> tuple[int, int] | None:
    """Where the first JSON object in `text` starts and ends (parse_json's object), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return match.start(), end
    return None


def parse_and_check(text: str, label_map: dict) -> dict | None:
    """The answer's JSON object if it parses and every field holds a value its map allows, else None."""
    obj = parse_json(text)
    if not isinstance(obj, dict):
        return None
    for pos in label_map["positions"]:
        if pos["field"] not in obj or obj[pos["field"]] not in list(pos["map"].values()):
            return None
    return obj


class SchemaConstraint:
    """The label map's schema compiled for this tokenizer (generation.GrammarProcessor applies it)."""

    def __init__(self, processor, model, label_map: dict):
        import xgrammar as xgr

        tok = getattr(processor, "tokenizer", processor)
        vocab = model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        # The exact layout training targets have (json.dumps: ", " and ": ", keys in order, no free whitespace):
        # free whitespace lets an unsure model pad forever and never close the object.
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(label_schema(label_map)), any_whitespace=False, separators=(", ", ": "))


# ----------------------------------------------------------------------------------------------------
# confidence
def _value_start(text: str, field: str) -> int | None:
    """Index in `text` where the value of "field" starts (after `"field":` and spaces)."""
    key = json.dumps(field, ensure_ascii=False) + ":"  # as training targets and the grammar write it: raw UTF-8
    at = text.find(key)
    if at < 0:
        return None
    at += len(key)
    while at < len(text) and text[at] == " ":
        at += 1
    return at


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: `cache` in newer transformers 5 releases (which warn
    about `past_key_values` once per call), `past_key_values` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


_ROWS_PER_PASS = 16  # candidate rows scored together; each holds a copy of the prompt's key/value cache


@torch.inference_mode()
def field_confidences(model, processor, inputs: dict, answer: str, label_map: dict) -> dict[str, dict]:
    """{field: {value: probability}} over each field's allowed values, for one prompt (`inputs`: the processor's
    output for that prompt alone, batch 1) and the answer generated for it.

    The prompt (and its image, through the vision tower) runs once; its key/value cache then serves every
    candidate of every field, continuing the answer from its start. Candidates are right-padded without an
    attention mask: in a causal model no real token attends to the padding after it."""
    tok = getattr(processor, "tokenizer", processor)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    rows = []  # (field, value, answer tokens with that value, index from which the field's candidates differ)
    for pos in label_map["positions"]:
        start = _value_start(answer, pos["field"])
        if start is None:
            continue
        values = list(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in pos["map"].values()))
        # The delimiter after the value makes the candidates prefix-free ("1" vs "10").
        after = answer[start:].lstrip()
        # The longest allowed value the answer starts with ("10", not "1", in "10, ...").
        rest = after[len(max((v for v in values if after.startswith(v)), key=len, default="")):]
        tail = rest[:1] if rest[:1] in (",", "}") else ","
        seqs = [tok(answer[:start] + v + tail, add_special_tokens=False)["input_ids"] for v in values]
        common = 0
        while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
            common += 1
        rows += [(pos["field"], v, s, common) for v, s in zip(values, seqs)]
    if not rows:
        return {}
    prefill = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, use_cache=True,
                    logits_to_keep=1)
    first = torch.log_softmax(prefill.logits[0, -1].float(), dim=-1)  # the answer's first token
    cache = getattr(prefill, "cache", None) or getattr(prefill, "past_key_values", None)
    cache_arg = _cache_argument(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = []
    for at in range(0, len(rows), _ROWS_PER_PASS):
        group = rows[at:at + _ROWS_PER_PASS]
        shared = copy.deepcopy(cache) if at + _ROWS_PER_PASS < len(rows) else cache
        shared.batch_repeat_interleave(len(group))
        width = max(len(s) for _, _, s, _ in group)
        ids = torch.tensor([s + [pad] * (width - len(s)) for _, _, s, _ in group], device=device)
        logp = torch.log_softmax(model(input_ids=ids, **{cache_arg: shared}).logits.float(), dim=-1)
        for row, (_, _, s, common) in enumerate(group):
            scores.append(sum(float(first[s[0]] if t == 0 else logp[row, t - 1, s[t]]) for t in range(common, len(s))))
    out: dict[str, dict] = {}
    for field in dict.fromkeys(r[0] for r in rows):
        mine = [(v, x) for (f, v, _, _), x in zip(rows, scores) if f == field]
        top = max(x for _, x in mine)
        norm = math.log(sum(math.exp(x - top) for _, x in mine)) + top
        out[field] = {v: math.exp(x - norm) for v, x in mine}
    return out


def with_confidence(parsed: dict | None, distributions: dict[str, dict], keep_model_confidence: bool) -> dict:
    """field_confidence {field: p(chosen value)} and the overall confidence = product over fields (the
    probability that every field is right, taking each normalised field probability as a conditional)."""
    if parsed is None:
        return {"field_confidence": {}, "confidence": None}
    conf = {}
    for field, dist in distributions.items():
        chosen = json.dumps(parsed.get(field), ensure_ascii=False)
        conf[field] = dist.get(chosen, 0.0)
    overall = math.prod(conf.values()) if conf else None
    if "confidence" in parsed and not keep_model_confidence and overall is not None:
        parsed["confidence"] = round(overall, 4)
    return {"field_confidence": {k: round(v, 4) for k, v in conf.items()}, "confidence": overall}
