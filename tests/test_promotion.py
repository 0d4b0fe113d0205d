from vlmtune.config import EvalConfig
from vlmtune.promotion import promotion_problems


def summary(accuracy=0.8, blind=0.6, previous=None, unfinished=0.0):
    baselines = {"blind": blind, **({"previous_adapter": previous} if previous is not None else {})}
    return {"accuracy": accuracy, "baselines": baselines, "hit_max_new_tokens_rate": unfinished}


def test_a_good_adapter_ships():
    assert promotion_problems(summary(previous=0.805), EvalConfig(max_regression=0.01)) == []


def test_each_rule_fires_on_its_own():
    config = EvalConfig(max_regression=0.01, max_unfinished_rate=0.05)
    [blind] = promotion_problems(summary(accuracy=0.6, blind=0.6), config)
    assert "blind" in blind
    [regressed] = promotion_problems(summary(previous=0.83), config)
    assert "previous adapter" in regressed
    [rambling] = promotion_problems(summary(unfinished=0.2), config)
    assert "max_new_tokens" in rambling
