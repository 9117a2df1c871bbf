"""Settings that are accepted but quietly weaken the method now say so, once, in one line each."""

import json
import warnings
from types import SimpleNamespace

import pytest

from constraints import Constraint, LengthConstraint
from l3m_lightning.data import ChatDataModule
from l3m_lightning.diagnostics import NoValidSamplesMonitor, TruncationMonitor, option_warnings
from l3m_lightning.module import L3MModule
from l3m_lightning.options import BarrierArgs, PolicyArgs, SamplingArgs
from toy_problem import chat_batch

TINY = PolicyArgs(config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2})
LENGTH = {"name": "length", "threshold": 5, "scale": 5}


def length(sense: str, threshold: float) -> LengthConstraint:
    return LengthConstraint(threshold=threshold, sense=sense, scale=10)


def messages(**kwargs) -> list[str]:
    settings = {"constraints": [length("at_most", 10)], "num_samples": 4, "max_new_tokens": 64, **kwargs}
    return option_warnings(**settings)


def test_defaults_raise_nothing():
    assert messages() == [] and option_warnings([], num_samples=1, max_new_tokens=64) == []


@pytest.mark.parametrize("settings, expected", [
    ({"num_samples": 1}, "model.sampling.num_samples=1: no leave-one-out baseline (one sample per prompt); each sample's baseline is the mean cost of the other samples in the batch"),
    ({"constraints": [length("at_least", 64)]}, "constraint 'length' (length >= 64) can never hold with room to spare: responses are cut at model.sampling.max_new_tokens=64"),
    ({"constraints": [length("at_most", 80)]}, "constraint 'length' (length <= 80) always holds: no response is longer than model.sampling.max_new_tokens=64"),
    ({"temperature": 0.7}, "model.sampling.temperature=0.7, model.sampling.top_k=0, model.sampling.top_p=1: responses are not sampled from the policy itself"),
    ({"top_k": 50}, "the constraint gradient is biased"),
    ({"constraints": [], "value_baseline": True, "constraint_warmup_steps": 10}, "model.value_baseline.enabled, model.barrier.warmup_steps: no effect without model.constraints"),
    ({"penalty_weights": [1.0]}, "model.multipliers.penalty_weights is ignored with model.multipliers.method: barrier"),
    ({"dual_init": 0.5}, "model.multipliers.dual_init is ignored with model.multipliers.method: barrier"),
    ({"method": "penalty", "penalty_weights": [1.0], "constraint_ema": 0.8}, "model.multipliers.ema has no effect with model.multipliers.method: penalty"),
])
def test_each_degrading_setting_has_its_line(settings, expected):
    found = messages(**settings)
    assert len(found) == 1 and expected in found[0] and "\n" not in found[0]


def test_module_warns_at_start():
    with pytest.warns(UserWarning) as record:
        L3MModule(policy=TINY, constraints=[LENGTH], sampling=SamplingArgs(num_samples=1, max_new_tokens=4))
    texts = [str(w.message) for w in record]
    assert any(t.startswith("model.sampling.num_samples=1: no leave-one-out baseline") for t in texts)
    assert any("(length <= 5) always holds: no response is longer than model.sampling.max_new_tokens=4" in t for t in texts)


def test_warm_up_longer_than_the_run_is_said_at_fit_start():
    module = L3MModule(policy=TINY, constraints=[LENGTH], barrier=BarrierArgs(warmup_steps=200), sampling=SamplingArgs(max_new_tokens=8))
    module._trainer = SimpleNamespace(max_steps=120)
    with pytest.warns(UserWarning, match=r"model.barrier.warmup_steps=200 >= trainer.max_steps=120: the constraints never switch on"):
        module.warn_if_constraints_never_start()
    module._trainer = SimpleNamespace(max_steps=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.warn_if_constraints_never_start()


def test_truncation_monitor_warns_once_when_every_step_of_the_window_is_mostly_cut():
    monitor = TruncationMonitor(max_new_tokens=16, window=3, threshold=0.5)
    assert monitor.update(1.0) == [] and monitor.update(1.0) == []  # the window is not full yet
    with pytest.warns(UserWarning, match=r"model.sampling.max_new_tokens=16: more than 50% of the sampled responses were cut at it "
                                         r"without a stop token in each of the last 3 steps \(83% on average\)"):
        assert len(monitor.update(0.5001)) == 1
    assert monitor.update(1.0) == []  # once
    learning = TruncationMonitor(max_new_tokens=16, window=3, threshold=0.5)  # the quickstart's first steps: learning to stop
    assert [learning.update(f) for f in (0.95, 0.9, 0.3, 0.9, 0.9)] == [[]] * 5


@pytest.fixture()
def batch(tokenizer):
    return chat_batch(tokenizer)


def _quiet_module(num_samples: int, max_new_tokens: int, **kwargs) -> L3MModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = L3MModule(policy=TINY, sampling=SamplingArgs(num_samples=num_samples, max_new_tokens=max_new_tokens), **kwargs)
    module.log = module.log_dict = lambda *a, **k: None  # no Trainer attached
    return module


def test_training_steps_feed_the_truncation_monitor(batch):
    module = _quiet_module(constraints=[LENGTH], num_samples=2, max_new_tokens=2)
    module.objective.truncation = TruncationMonitor(max_new_tokens=2, window=2)  # a random-init model almost never stops within 2 tokens
    with pytest.warns(UserWarning, match="model.sampling.max_new_tokens=2: .* were cut at it"):
        for _ in range(2):
            module.training_step(batch, 0)


class AllDropped(Constraint):
    default_scale = 1.0

    def score(self, prompts, completions, completion_ids, **columns):
        return [None] * len(completions)


def test_a_step_without_any_valid_sample_is_said_once(batch):
    module = _quiet_module(constraints=[AllDropped(threshold=0.0, name="judge")], num_samples=2, max_new_tokens=2)
    with pytest.warns(UserWarning, match=r"constraint 'judge': no valid sample at step 0 .* its estimate is taken as 0"):
        module.training_step(batch, 0)
    assert NoValidSamplesMonitor(["a"]).update([3], step=1) == []


def test_cut_reference_responses_are_counted(tmp_path, tokenizer):
    rows = [{"prompt": f"question {i}?", "response": "a long answer " * (1 + i % 3)} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match=r"data.max_response_tokens=4: \d+ of \d+ train reference responses are longer and were cut"):
        ChatDataModule(dataset=str(path), batch_size=4, max_response_tokens=4, val_fraction=0.2).setup("fit")
