"""MetricSuite (issue 17 step 1): a named list of registered metrics whose values are exactly evaluate()'s, with
unknown names listing the known ones, missing splits named, and a JSON result written atomically."""

from __future__ import annotations

import json
import math

import pytest

from erasus_ray.errors import InvalidConfigError, UnknownNameError
from erasus_ray.evaluation import METRICS, evaluate
from erasus_ray.evaluation.suite import MetricSuite, SuiteResult
from erasus_ray.tasks import CapabilityError

NAMES = ["forget_acc", "retain_acc", "test_acc", "mia_loss_auc", "mia_svc_efficacy"]


def test_suite_values_equal_evaluate(digits_class):
    b = digits_class
    result = MetricSuite(NAMES).run(b.original, b.forget, b.retain, b.test, task=b.task, seed=3)
    expected = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, metrics=NAMES, seed=3)
    assert list(result) == NAMES
    assert {k: result[k] for k in NAMES} == {k: expected[k] for k in NAMES}
    assert result.task == b.task.name and result.seed == 3
    # the values are the model's own: the gold model (never trained on the forgotten class) differs on forget
    gold = MetricSuite(NAMES).run(b.gold, b.forget, b.retain, b.test, task=b.task, seed=3)
    assert result["forget_acc"] > 0.9 > 0.1 > gold["forget_acc"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        MetricSuite(["forget_acc", "forget_acuracy"])
    message = str(err.value)
    assert "forget_acuracy" in message and "forget_acc" in message
    assert all(name in message for name in METRICS.names())
    with pytest.raises(InvalidConfigError, match="more than once"):
        MetricSuite(["forget_acc", "forget_acc"])
    with pytest.raises(InvalidConfigError, match="at least one"):
        MetricSuite([])


def test_missing_split_and_capability_are_named(digits_class):
    b = digits_class
    with pytest.raises(InvalidConfigError, match=r"mia_loss_auc.*\['test'\].*test="):
        MetricSuite(["forget_acc", "mia_loss_auc"]).run(b.original, b.forget, b.retain, task=b.task)
    # a metric that reads no test split runs without one
    only = MetricSuite(["forget_acc", "retain_loss"]).run(b.original, b.forget, b.retain, task=b.task)
    assert set(only) == {"forget_acc", "retain_loss"}
    with pytest.raises(CapabilityError, match="forget_rougeL"):
        MetricSuite(["forget_rougeL"]).run(b.original, b.forget, b.retain, task=b.task)


def test_save_writes_the_dict_as_json(tmp_path):
    result = SuiteResult({"forget_acc": 0.25, "mia_loss_auc": math.nan}, task="classification", seed=1,
                         options={"batch_size": 8})
    path = tmp_path / "metrics.json"
    result.save(path)
    loaded = json.loads(path.read_text())
    assert loaded == result.to_dict()
    assert loaded == {"task": "classification", "seed": 1, "options": {"batch_size": 8},
                      "metrics": {"forget_acc": 0.25, "mia_loss_auc": None}}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left beside it
