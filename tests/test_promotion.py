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


def with_leads(base: dict, **leads) -> dict:
    return {**base, "lead_ci95": leads}


def test_the_interval_gate_refuses_a_lead_over_blind_the_noise_could_explain():
    # the smoke run's case: 71.5 % against a blind 70.0 % on 200 questions
    noisy = with_leads(summary(accuracy=0.715, blind=0.70), blind=[-0.02, 0.05])
    [problem] = promotion_problems(noisy, EvalConfig())
    assert "95 % confidence" in problem
    assert promotion_problems(noisy, EvalConfig(gate="point")) == []  # the smoke profile's point-estimate gate
    assert promotion_problems(with_leads(summary(accuracy=0.715, blind=0.70), blind=[0.004, 0.03]), EvalConfig()) == []


def test_the_interval_gate_refuses_a_regression_the_interval_does_not_rule_out():
    # the point estimate is within the tolerance, the paired interval reaches beyond it
    slipping = with_leads(summary(accuracy=0.80, previous=0.805), blind=[0.1, 0.3], previous_adapter=[-0.03, 0.02])
    [problem] = promotion_problems(slipping, EvalConfig(max_regression=0.01))
    assert "previous adapter" in problem and "-3.0%" in problem
    steady = with_leads(summary(accuracy=0.80, previous=0.805), blind=[0.1, 0.3], previous_adapter=[-0.008, 0.004])
    assert promotion_problems(steady, EvalConfig(max_regression=0.01)) == []
