"""VLM answers that are valid by construction, with a confidence from the model's own probabilities.

    python main.py --task evaluate --model_type vlm            constrained answers, field confidences, calibration
    python main.py --task inference --model_type vlm           the same for each image
    python main.py --task evaluate ... --constrained_decoding false --report_unconstrained true

The JSON schema comes from label_map.json: one property per position (an enum of its map's values, with their
JSON types), then the `defaults` keys typed by their default value, in the order training writes them.
Generation is constrained to it with xgrammar (chosen by measurement: bench/bench_constrained.py). A field's
confidence is the model's probability of the value it chose, normalised over the values the field allows:
every allowed value is scored, by teacher forcing, from the point where the candidates diverge.
"""

from __future__ import annotations

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
    """Builds a fresh xgrammar logits processor per generate call (it keeps per-sequence matcher state)."""

    def __init__(self, processor, model, label_map: dict):
        import xgrammar as xgr

        tok = getattr(processor, "tokenizer", processor)
        vocab = model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        # The exact layout training targets have (json.dumps: ", " and ": ", keys in order, no free whitespace):
        # free whitespace lets an unsure model pad forever and never close the object.
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(label_schema(label_map)), any_whitespace=False, separators=(", ", ": "))
        self._xgr = xgr

    def logits_processor(self):
        return self._xgr.contrib.hf.LogitsProcessor(self.compiled)


# ----------------------------------------------------------------------------------------------------
# confidence
def _value_start(text: str, field: str) -> int | None:
    """Index in `text` where the value of "field" starts (after `"field":` and spaces)."""
    key = json.dumps(field) + ":"
    at = text.find(key)
    if at < 0:
        return None
    at += len(key)
    while at < len(text) and text[at] == " ":
        at += 1
    return at


@torch.inference_mode()
def field_confidences(model, processor, inputs: dict, answer: str, label_map: dict) -> dict[str, dict]:
    """{field: {value: probability}} over each field's allowed values, for one prompt (`inputs`: the processor's
    output for that prompt alone, batch 1) and the answer generated for it."""
    tok = getattr(processor, "tokenizer", processor)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    prompt_ids = inputs["input_ids"][0].tolist()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = {}
    for pos in label_map["positions"]:
        start = _value_start(answer, pos["field"])
        if start is None:
            continue
        values = list(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in pos["map"].values()))
        # The delimiter after the value makes the candidates prefix-free ("1" vs "10").
        after = answer[start:].lstrip()
        rest = after[len(next((v for v in values if after.startswith(v)), "")):]
        tail = rest[:1] if rest[:1] in (",", "}") else ","
        seqs = [prompt_ids + tok(answer[:start] + v + tail, add_special_tokens=False)["input_ids"] for v in values]
        common = 0
        while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
            common += 1
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        batch_extra = {}
        for k, v in extra.items():  # images: the same picture for every candidate
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == len(prompt_ids):
                batch_extra[k] = torch.nn.functional.pad(v, (0, width - v.shape[1])).repeat(len(seqs), 1).to(device)
            elif torch.is_tensor(v):
                batch_extra[k] = torch.cat([v] * len(seqs)).to(device)
        logits = model(input_ids=ids, attention_mask=mask, **batch_extra).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        scores = []
        for row, s in enumerate(seqs):
            scores.append(sum(float(logp[row, t - 1, s[t]]) for t in range(common, len(s))))
        top = max(scores)
        norm = math.log(sum(math.exp(x - top) for x in scores)) + top
        out[pos["field"]] = {v: math.exp(x - norm) for v, x in zip(values, scores)}
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
