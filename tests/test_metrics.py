"""Answer metrics: character-level text metrics and per-field VLM metrics."""

import json

import pytest

from metrics import bleu, field_metrics, lcs_length, plot_confusion, rouge_l, text_metrics


def test_lcs_and_rouge_l_on_characters():
    assert lcs_length("早点睡觉", "早睡早起") == 2
    assert rouge_l("早点睡觉", "早点睡觉") == 1.0
    assert rouge_l("", "答案") == 0.0
    p, r = 2 / 4, 2 / 4
    assert rouge_l("早点睡觉", "早睡早起") == pytest.approx(2 * p * r / (p + r))


def test_bleu_on_characters():
    assert bleu("保持规律的作息", "保持规律的作息") == pytest.approx(1.0)
    assert bleu("完全不同", "保持规律的作息") == 0.0
    short = bleu("保持规律", "保持规律的作息")            # precise but short: brevity penalty
    assert 0 < short < 0.6


def test_text_metrics_average():
    m = text_metrics(["答案一", "错"], ["答案一", "答案二"])
    assert m["exact_match"] == 0.5
    assert m["rouge_l"] == 0.5 and 0 < m["bleu"] <= 0.5


def test_field_metrics_with_invalid_answers(tmp_path):
    targets = [{"status": "Leakage"}, {"status": "No Leakage"}, {"status": "No Leakage"}, {"status": "Leakage"}]
    parsed = [{"status": "Leakage"}, {"status": "No Leakage"}, {"status": "Leakage"}, None]
    m = field_metrics(parsed, targets, ["status"])["status"]
    assert m["accuracy"] == 0.5 and m["majority_baseline"] == 0.5
    assert m["labels"] == ["Leakage", "No Leakage", "<invalid>"]
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]   # rows = truth
    assert m["per_class"]["Leakage"]["support"] == 2 and m["per_class"]["Leakage"]["recall"] == 0.5
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)   # over the true classes only
    json.dumps(m)                                                          # serialisable as it is
    plot_confusion("status", m, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
