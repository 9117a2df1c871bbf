"""FSDP2 generation context in one process (world size 1, gloo): same tokens, state restored exactly."""

import pytest
import torch
import torch.distributed as dist

from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.sampling import sample_rollouts
from l3m_lightning.sharding import fsdp2_modules, unsharded_for_generation

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


def test_a_plain_model_is_left_alone(tokenizer):
    model = build_embedded_model(tokenizer, TINY)
    with unsharded_for_generation(model) as gathered:
        assert gathered is False


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _reshard_settings(model):
    return [(m._get_fsdp_state()._auto_reshard_after_forward, [g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups])
            for m in fsdp2_modules(model)]


def test_fsdp2_model_generates_the_same_tokens_gathered_and_is_restored(tokenizer, process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build_embedded_model(tokenizer, TINY).eval()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = torch.tensor([tokenizer("What is 2 plus 2?", add_special_tokens=False)["input_ids"]])
    kwargs = dict(num_samples=1, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)

    sharded = sample_rollouts(model, ids, torch.ones_like(ids), **kwargs)  # first forward: FSDP2 lazy init
    before = _reshard_settings(model)
    with unsharded_for_generation(model) as gathered:
        assert gathered
        assert not any(isinstance(p, DTensor) for p in model.parameters())  # full tensors while decoding
        inside = sample_rollouts(model, ids, torch.ones_like(ids), **kwargs)
    assert inside.completion_ids == sharded.completion_ids
    assert _reshard_settings(model) == before
    assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded


def test_gathering_before_the_first_forward_leaves_the_usual_fsdp2_settings(tokenizer, process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    models = []
    for _ in range(2):
        model = build_embedded_model(tokenizer, TINY).eval()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        models.append(fully_shard(model, mesh=mesh))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        models[0](input_ids=ids)  # the usual first use: a forward pass settles the root's setting
        with unsharded_for_generation(models[1]):  # first use: generation
            models[1](input_ids=ids)
    assert _reshard_settings(models[1]) == _reshard_settings(models[0])
    assert _reshard_settings(models[0])[0][1] == [None]  # the root keeps its parameters after forward
