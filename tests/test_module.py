"""L3MModule pieces without a Trainer: plain SFT without constraints, bad rewards, the loss reductions."""

from unittest import mock

import pytest
import torch

from constraints import CONSTRAINTS, Constraint
from l3m_lightning.module import L3MModule
from l3m_lightning.objective import ObjectiveStep
from toy_problem import TINY_POLICY as TINY
from toy_problem import chat_batch, tiny_module as _module

LENGTH = [{"name": "length", "threshold": 2, "scale": 4}]


@pytest.fixture()
def batch(tokenizer):
    return chat_batch(tokenizer)


def test_without_constraints_the_step_is_plain_sft(batch):
    module = _module()
    with mock.patch.object(module, "sample", side_effect=AssertionError("SFT must not sample")):
        loss = module.training_step(batch, 0)
    assert torch.allclose(loss, module.sft_loss(batch)[0])


def test_sequence_reduction_scales_by_tokens_per_response(batch):
    token, _ = _module().sft_loss(batch)
    sequence, token_nll = _module(sft_loss_reduction="sequence").sft_loss(batch)
    tokens_per_response = (batch["labels"][:, 1:] != -100).sum() / batch["labels"].shape[0]
    assert torch.allclose(token_nll, token.detach())
    assert torch.allclose(sequence, token * tokens_per_response)


def test_constrained_step_reads_lambda_off_the_barrier(batch):
    import l3m_lightning.objective as objective_py
    from l3m_lightning.barrier import relaxed_log_barrier_grad

    module = _module(constraints=LENGTH, sampling={"num_samples": 2}, barrier={"mu_start": 0.5})
    calls = []
    real = objective_py.policy_gradient_surrogate

    def spy(logprobs, costs, multipliers, group_size, valid):
        calls.append((logprobs, costs, multipliers, group_size))
        return real(logprobs, costs, multipliers, group_size, valid)

    torch.manual_seed(0)
    with mock.patch.object(objective_py, "policy_gradient_surrogate", spy):
        loss = module.training_step(batch, 0)
    logprobs, costs, multipliers, group_size = calls[0]
    assert group_size == 2 and logprobs.shape == (4,) and logprobs.requires_grad
    estimate = costs.mean()  # Ĉ = mean of (length - 2)/4 over the 4 samples
    assert multipliers.item() == pytest.approx(relaxed_log_barrier_grad(estimate, 0.5).item())
    step = module.last_step  # the step's typed result, as callbacks read it
    assert isinstance(step, ObjectiveStep) and step.names == ["length"] and step.mu == 0.5
    assert step.costs.shape == step.valid.shape == step.rewards.shape == (1, 4) and step.value_loss is None
    torch.testing.assert_close(step.estimates, costs.mean(dim=1).to(step.estimates))
    torch.testing.assert_close(step.multipliers, multipliers.to(step.multipliers))
    assert (step.rewards * 1.0 == step.costs * 4 + 2).all()  # length rewards: c = (r - 2)/4
    loss.backward()
    assert torch.isfinite(loss)


class _NaNReward(Constraint):
    default_scale = 1.0

    def score(self, prompts, completions, completion_ids, **columns):
        return [float("nan")] * len(completions)


def test_nan_reward_fails_the_step_naming_constraint_and_sample(batch):
    CONSTRAINTS["nan_reward"] = _NaNReward
    try:
        module = _module(constraints=[{"name": "nan_reward", "threshold": 0.0}])
        with pytest.raises(ValueError, match=r"constraint 'nan_reward': score\(\) returned nan for sample 0"):
            module.training_step(batch, 0)
    finally:
        CONSTRAINTS.pop("nan_reward")


@pytest.mark.parametrize("kwargs, message", [
    ({"sampling": {"num_samples": 0}}, "model.sampling.num_samples must be >= 1"),
    ({"sampling": {"temperature": 0.0}}, "model.sampling.temperature must be > 0"),
    ({"sft_loss_reduction": "mean"}, "model.sft_loss_reduction must be 'token' or 'sequence'"),
    ({"value_baseline": {"gae_lambda": 1.2}}, r"model.value_baseline.gae_lambda must be in \[0, 1\]"),
    ({"value_baseline": {"gae_lambda": 0.9}}, "model.value_baseline.gae_lambda=0.9 needs model.value_baseline.enabled: true"),
    ({"barrier": {"warmup_steps": -1}}, "model.barrier.warmup_steps must be >= 0"),
    ({"barrier": {"mu_flor": 0.1}}, "model.barrier: unknown option 'mu_flor'"),
])
def test_bad_hyperparameters_fail_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        L3MModule(policy={"config": TINY}, **kwargs)


def test_checkpoint_round_trip_restores_mu_and_learned_multipliers(batch):
    spec = [{"name": "length", "threshold": 2, "scale": 4}]
    options = {"constraints": spec, "multipliers": {"method": "lagrangian", "dual_lr": 0.5}, "sampling": {"num_samples": 2}}
    trained = _module(**options)
    torch.manual_seed(0)
    trained.training_step(batch, 0)
    for _ in range(3):
        trained.objective.after_optimizer_step()
    checkpoint: dict = {}
    trained.on_save_checkpoint(checkpoint)
    assert set(checkpoint["l3m"]) == {"mu_schedule", "constraint_ema", "multipliers", "feasibility", "constraints", "packing_ok", "sharing_ok",
                                       "head_ok"}
    assert checkpoint["l3m"]["head_ok"] is True  # the step checked the output layer, and a resumed run need not

    resumed = _module(**options)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._head_ok is True
    assert resumed.objective.mu_schedule.state_dict() == trained.objective.mu_schedule.state_dict()
    assert torch.equal(resumed.objective.multiplier_rule.lambdas, trained.objective.multiplier_rule.lambdas)
    assert trained.objective.multiplier_rule.lambdas.item() > 0  # the step moved λ off its zero start
    assert resumed.objective.training_state().keys() == trained.objective.training_state().keys()
    assert resumed.objective.feasibility.state_dict() == trained.objective.feasibility.state_dict()


def test_feasibility_monitor_warns_once_for_infeasible_and_never_active():
    from l3m_lightning.diagnostics import FeasibilityMonitor

    monitor = FeasibilityMonitor(["short", "loose"], patience=3)
    raised = []
    with pytest.warns(UserWarning, match="constraint 'short'.*linear region"):
        for _ in range(5):  # 'short' violated every step; 'loose' satisfied with lots of slack
            raised += monitor.update([0.5, -2.0], [10.0, 1e-5], mu=0.1)
    assert len(raised) == 1 and "3 steps" in raised[0]
    with pytest.warns(UserWarning, match="constraint 'loose'.*never exceeded"):
        assert len(monitor.at_end()) == 1
    assert monitor.update([-1.0, -2.0], [0.1, 0.0], mu=0.1) == [] and monitor.linear_streak[0] == 0


def test_packed_and_shared_prompt_passes_give_the_same_loss_and_gradients_as_two_passes(batch):
    spec = [{"name": "length", "threshold": 2, "scale": 4}]
    results = []
    for fused, shared in ((False, False), (True, False), (False, True)):
        module = _module(constraints=spec, sampling={"num_samples": 2}, policy={"fused_forward": fused, "share_prompts": shared})
        torch.manual_seed(0)
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.model.parameters()]))
        assert module._packing_ok is (True if fused else None)  # the fused run really packed
        assert module._sharing_ok is (True if shared else None)  # the shared run really shared
    (split_loss, split_grads), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, split_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, split_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_trains_adapters_only_and_exports_a_merged_model(batch, tmp_path):
    from transformers import AutoModelForCausalLM

    module = _module(policy={"lora": {"r": 4, "lora_alpha": 8}}, constraints=LENGTH, sampling={"num_samples": 2})
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_B" in n}
    opt = torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(0)
    module.training_step(batch, 0).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if "lora_B" in n)

    module.options.export_dir = str(tmp_path / "export")
    module._trainer = mock.Mock(is_global_zero=True, world_size=1, checkpoint_callbacks=[], global_step=1)  # the export records them (outputs.export_marker)
    module.on_fit_end()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in exported.named_parameters())


def _token_reward(prompts, completions, completion_ids, **kwargs):
    """Varies from sample to sample (a tiny random model's samples all run to max_new_tokens: their lengths don't)."""
    return [sum(ids) % 7 / 7 for ids in completion_ids]


VARYING = [{"name": "reward_function", "function": _token_reward, "threshold": 0.1, "sense": "at_most", "scale": 1.0}]


def _policy_gradient(batch, **kwargs) -> torch.Tensor:
    module = _module(constraints=VARYING, sampling={"num_samples": 2}, **kwargs)
    torch.manual_seed(0)
    module.training_step(batch, 0).backward()
    return torch.cat([p.grad.flatten() for p in module.model.parameters()]), module


def test_value_baseline_starts_as_the_leave_one_out_estimator_and_trains_its_head(batch):
    without, _ = _policy_gradient(batch)
    with_head, module = _policy_gradient(batch, value_baseline={"enabled": True})
    sft_only = _module()
    sft_only.sft_loss(batch)[0].backward()
    sft = torch.cat([p.grad.flatten() for p in sft_only.model.parameters()])
    assert (without - sft).abs().max() > 1e-3 * sft.abs().max()  # the constraint term is not zero here
    torch.testing.assert_close(with_head, without, rtol=1e-5, atol=1e-7)  # zero-initialised V: the same policy gradient
    head_grad = module.objective.value_head.linear.bias.grad
    assert head_grad is not None and head_grad.abs().sum() > 0


def test_gae_lambda_changes_the_policy_gradient(batch):
    """With V = 0 (its start) GAE(0) credits only each sample's last token: a different gradient from λ = 1."""
    monte_carlo, _ = _policy_gradient(batch, value_baseline={"enabled": True})
    gae, _ = _policy_gradient(batch, value_baseline={"enabled": True, "gae_lambda": 0.0})
    assert (monte_carlo - gae).abs().max() > 1e-3 * monte_carlo.abs().max()


def test_the_value_head_has_its_own_learning_rate():
    from types import SimpleNamespace

    module = _module(constraints=LENGTH, value_baseline={"enabled": True, "lr": 0.05}, optimizer={"learning_rate": 1e-6})
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    head = {id(p) for p in module.objective.value_head.parameters()}
    groups = [g for g in optimizer.param_groups if any(id(p) in head for p in g["params"])]
    assert len(groups) == 1 and groups[0]["initial_lr"] == 0.05 and all(id(p) in head for p in groups[0]["params"])
    assert all(g["initial_lr"] == 1e-6 for g in optimizer.param_groups if g is not groups[0])


@pytest.mark.parametrize("fused", [True, False])
def test_the_optimizer_is_fused_adamw_unless_told_otherwise(fused):
    """``model.optimizer.fused``: one kernel per update on CPU/CUDA; ``false`` keeps the per-tensor loop of earlier runs."""
    module = _module(optimizer={"fused": fused})
    optimizer = module.build_optimizer(total_steps=10)["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults["fused"]) is fused
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_fused_and_per_tensor_adamw_take_the_same_step():
    """The fused kernel computes AdamW's update (to rounding): switching it on changes speed, not the method."""
    from l3m_lightning.optim import adamw_warmup_cosine

    torch.manual_seed(0)
    weights = [torch.randn(4, 3), torch.randn(3)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = adamw_warmup_cosine([{"params": params, "weight_decay": 0.1}], learning_rate=1e-2, betas=(0.9, 0.95), warmup_ratio=0.0,
                                  min_lr_ratio=0.1, total_steps=5, fused=fused)["optimizer"]
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        results.append([p.detach() for p in params])
    for slow, fast in zip(*results):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)


def test_held_out_values_are_averaged_per_prompt_over_eval_num_samples(batch):
    from l3m_lightning.sampling import pack_rollouts

    module = _module(constraints=LENGTH, evaluation={"num_samples": 2})
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    new = torch.tensor([[7, eos, pad, pad], [7, 8, 9, eos], [7, 8, eos, pad], [7, 8, 9, 9]])  # lengths 1, 3 | 2, 4
    rollouts = pack_rollouts(batch["prompt_input_ids"], batch["prompt_attention_mask"], new, 2, eos, pad)
    with mock.patch.object(module, "sample", return_value=rollouts) as sample:
        module._eval_step(batch)
    assert sample.call_args.kwargs["num_samples"] == 2
    assert module.eval_values["length"].compute().tolist() == [2.0, 3.0]
    assert module.eval_values["length__reward"].compute().tolist() == [2.0, 3.0]
    torch.testing.assert_close(module.eval_values["length__cost"].compute(), torch.tensor([0.0, 0.25]))


def test_clipping_by_norm_under_fsdp1_goes_through_fsdp(batch, tmp_path):
    """Lightning's FSDP precision refuses norm clipping; the module clips through FSDP's own clip_grad_norm_."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        module = _module()
        root = FullyShardedDataParallel(module, device_id=torch.device("cpu"))
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
        (1e3 * module.sft_loss(batch)[0]).backward()
        grad_norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in root.parameters() if p.grad is not None]))  # noqa: E731
        assert grad_norm() > 10
        with mock.patch.object(module, "clip_gradients", side_effect=AssertionError("Lightning's clip refuses FSDP")):
            module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        assert grad_norm() == pytest.approx(1.0, rel=1e-4)
    finally:
        dist.destroy_process_group()


def test_clipping_without_fsdp_is_lightnings(batch):
    module = _module()
    module._trainer = mock.Mock(strategy=mock.Mock(model=module))
    with mock.patch.object(module, "clip_gradients") as clip:
        module.configure_gradient_clipping("opt", gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    clip.assert_called_once_with("opt", 1.0, "norm")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_fit_clips_the_fused_optimizers_gradients(tmp_path, algorithm):
    """Lightning's mixed precision refuses to clip for a fused optimizer (under fp16 its gradients would still be scaled);
    under bf16-mixed nothing is scaled, so the module clips the true gradients itself, every step."""
    import lightning as L

    from l3m_lightning.data import ChatDataModule

    clip_val = 1e-3  # below every step's gradient: clipping always acts
    seen: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_ if algorithm == "norm" else torch.nn.utils.clip_grad_value_

    def clipping(params, *args, **kwargs):  # the value positional or by keyword (clip_value=, max_norm=)
        params = list(params)
        result = clip(params, *args, **kwargs)
        grads = [p.grad for p in params if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if algorithm == "norm"
                    else max(float(g.abs().max()) for g in grads))
        return result

    module = L3MModule(policy={"config": TINY}, constraints=LENGTH, sampling={"num_samples": 2, "max_new_tokens": 4}, export_dir="")
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    with mock.patch(f"torch.nn.utils.{clip.__name__}", side_effect=clipping):
        trainer.fit(module, datamodule=ChatDataModule(embedded_num_prompts=40, batch_size=2))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(seen) == 2 and all(v <= clip_val * (1 + 1e-3) for v in seen)


def test_under_fp16_loss_scaling_the_optimizer_is_not_fused():
    """A fused step unscales fp16 gradients itself, after clipping would have seen them scaled: the module builds the per-tensor AdamW."""
    from types import SimpleNamespace

    module = _module()
    for scaler, fused in ((object(), False), (None, True)):
        module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), estimated_stepping_batches=10)
        assert bool(module.configure_optimizers()["optimizer"].defaults["fused"]) is fused


def test_constraint_warmup_is_plain_sft_then_the_barrier_switches_on(batch):
    """Before ``barrier.warmup_steps`` no sampling and μ stays put; from then on the constrained step as usual."""
    module = _module(constraints=LENGTH, sampling={"num_samples": 2}, value_baseline={"enabled": True},
                     barrier={"warmup_steps": 3, "mu_start": 0.5, "mu_decay": 0.5, "mu_decay_every": 1})
    step = mock.PropertyMock(return_value=2)
    with mock.patch.object(L3MModule, "global_step", step), \
            mock.patch.object(module, "sample", side_effect=AssertionError("warm-up must not sample")), \
            mock.patch("lightning.pytorch.LightningModule.optimizer_step"):
        loss = module.training_step(batch, 0)
        loss.backward()
        module.optimizer_step()
    torch.testing.assert_close(loss, module.sft_loss(batch)[0])
    assert module.objective.value_head.linear.weight.grad is not None  # in the graph (DDP), with a zero gradient
    assert module.objective.value_head.linear.weight.grad.abs().sum() == 0
    assert module.objective.mu == 0.5 and module.objective.mu_schedule.steps == 0

    step.return_value = 3
    with mock.patch.object(L3MModule, "global_step", step), mock.patch("lightning.pytorch.LightningModule.optimizer_step"):
        torch.manual_seed(0)
        constrained = module.training_step(batch, 1)
        module.optimizer_step()
    assert not torch.allclose(constrained, module.sft_loss(batch)[0])
    assert module.objective.mu == 0.25 and module.objective.mu_schedule.steps == 1


class _References(Constraint):
    """Records the columns it is given; reward: the sample's length minus its reference's, in characters."""

    default_scale = 1.0
    seen: list = []

    def score(self, prompts, completions, completion_ids, references, **columns):
        _References.seen.append((list(prompts), list(completions), list(references), sorted(columns)))
        return [float(len(c) - len(r)) for c, r in zip(completions, references)]


def test_constraints_receive_each_samples_reference_aligned_with_its_completion(batch):
    _References.seen = []
    module = _module(constraints=[_References(threshold=0.0, name="vs_reference")], sampling={"num_samples": 3})
    torch.manual_seed(0)
    module.training_step(batch, 0)
    (prompts, completions, references, others), = _References.seen
    assert len(prompts) == len(completions) == len(references) == 6 and others == []
    for j, (prompt, reference) in enumerate(zip(prompts, references)):  # samples of one prompt are contiguous
        i = j // 3
        assert prompt == batch["prompts"][i] and reference == batch["references"][i]
    assert module.last_step.rewards[0].tolist() == [float(len(c) - len(r)) for c, r in zip(completions, references)]


def test_a_constraint_without_columns_in_its_signature_still_works(batch):
    class NoColumns(Constraint):
        default_scale = 1.0

        def score(self, prompts, completions, completion_ids):
            return [1.0] * len(completions)

    module = _module(constraints=[NoColumns(threshold=0.0, name="plain")])
    torch.manual_seed(0)
    assert torch.isfinite(module.training_step(batch, 0))


def test_objective_training_state_round_trips_through_a_fresh_objective(batch):
    spec = [{"name": "length", "threshold": 2, "scale": 4}]
    options = {"constraints": spec, "multipliers": {"ema": 0.5}, "barrier": {"mu_decay_every": 1, "mu_decay": 0.5}}
    trained = _module(**options)
    torch.manual_seed(0)
    for _ in range(2):
        trained.training_step(batch, 0)
        trained.objective.after_optimizer_step()
    state = trained.objective.training_state()
    fresh = _module(**options).objective
    fresh.load_training_state(state)
    assert fresh.mu == trained.objective.mu == 0.25
    torch.testing.assert_close(fresh.ema.value, trained.objective.ema.value)
    assert fresh.training_state()["mu_schedule"] == state["mu_schedule"]
    assert fresh.feasibility.state_dict() == state["feasibility"]


def test_a_checkpoint_from_before_the_objective_loads_its_value_head(batch):
    """The value head's parameters were ``value_head.*`` on the module; they are ``objective.value_head.*`` now."""
    options = {"constraints": LENGTH, "value_baseline": {"enabled": True}}
    trained = _module(**options)
    with torch.no_grad():
        trained.objective.value_head.linear.weight.fill_(0.25)
    old = {k.removeprefix("objective."): v for k, v in trained.state_dict().items()}
    assert "value_head.linear.weight" in old
    checkpoint = {"state_dict": old, "l3m": {"mu_schedule": {"mu": 0.3, "steps": 7}, "constraint_ema": {"decay": 0.0, "value": None},
                                             "constraints": {"length": {}}}}  # an early layout: no multipliers, no feasibility
    resumed = _module(**options)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert (resumed.objective.value_head.linear.weight == 0.25).all() and resumed.objective.mu == 0.3


def test_hparams_are_plain_values_and_load_back(tmp_path):
    import yaml
    from lightning.pytorch.core.saving import load_hparams_from_yaml, save_hparams_to_yaml

    from l3m_lightning.options import BarrierArgs, SamplingArgs

    module = L3MModule(policy={"config": TINY}, barrier=BarrierArgs(mu_floor=0.2), sampling=SamplingArgs(num_samples=3))
    assert module.hparams["barrier"]["mu_floor"] == 0.2 and module.hparams["optimizer"]["betas"] == [0.9, 0.95]
    save_hparams_to_yaml(tmp_path / "hparams.yaml", module.hparams)
    loaded = load_hparams_from_yaml(tmp_path / "hparams.yaml")
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text())["sampling"]["num_samples"] == 3
    again = L3MModule(**loaded)
    assert again.options.barrier == module.options.barrier and again.options.sampling.num_samples == 3
    assert again.options.optimizer.betas == (0.9, 0.95)


def test_load_from_checkpoint_reads_a_checkpoint_with_the_old_flat_options(tmp_path, batch):
    """Before issue 13 the options were flat (``mu_floor``, ``value_baseline: true``) and the value head sat on the module."""
    import lightning as L

    from l3m_lightning.options import MOVED_KEYS

    trained = _module(constraints=LENGTH, value_baseline={"enabled": True}, barrier={"mu_floor": 0.2})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    flat = {}
    for key, value in checkpoint["hyper_parameters"].items():
        if isinstance(value, dict) and key != "constraints":
            for field, v in value.items():
                old = next((o for o, n in MOVED_KEYS.items() if n == f"{key}.{field}"), None)
                if old is not None:
                    flat[old] = v
        else:
            flat[key] = value
    assert flat["mu_floor"] == 0.2 and flat["value_baseline"] is True and flat["model_config"] == TINY
    checkpoint["hyper_parameters"] = flat
    checkpoint["state_dict"] = {k.removeprefix("objective."): v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "old.ckpt")

    loaded = L3MModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.options.barrier.mu_floor == 0.2 and loaded.options.value_baseline.enabled
    assert loaded.options.policy.config == TINY and loaded.options.sampling.max_new_tokens == 4
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    again = L3MModule.load_from_checkpoint(tmp_path / "new.ckpt")  # and today's layout as it is
    assert again.options.barrier == trained.options.barrier and again.options.value_baseline == trained.options.value_baseline
