"""cuDNN's attention (a plan per new shape) stays off inside the module's steps and backward unless asked for."""

import pytest
import torch

from l3m_lightning.attention import attention_kernels

LENGTH = [{"name": "length", "threshold": 2, "scale": 4}]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _switches() -> dict[str, bool]:
    b = torch.backends.cuda
    return {"cudnn": b.cudnn_sdp_enabled(), "flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}


def test_the_context_turns_cudnn_off_keeps_the_others_as_they_were_and_restores_them():
    before = _switches()
    assert before["cudnn"]  # PyTorch's default
    with attention_kernels(cudnn=False):
        assert _switches() == {**before, "cudnn": False}
    assert _switches() == before
    with attention_kernels(cudnn=True):
        assert _switches() == before
    torch.backends.cuda.enable_flash_sdp(False)  # the user's own choice survives, inside and after
    try:
        with attention_kernels(cudnn=False):
            assert _switches() == {**before, "cudnn": False, "flash": False}
        assert _switches() == {**before, "flash": False}
    finally:
        torch.backends.cuda.enable_flash_sdp(True)


@pytest.mark.parametrize("cudnn_attention", [False, True])
def test_fit_and_predict_run_every_forward_and_backward_with_cudnn_attention_as_configured(tmp_path, cudnn_attention):
    """The training step (sampling, scoring, the objective), the backward (which recomputes forwards under gradient
    checkpointing), validation and predict all see the switch; it is back as it was afterwards."""
    import lightning as L

    from l3m_lightning.data import ChatDataModule
    from l3m_lightning.module import L3MModule

    module = L3MModule(policy={"config": TINY, "cudnn_attention": cudnn_attention, "gradient_checkpointing": True},
                       constraints=LENGTH, sampling={"num_samples": 2, "max_new_tokens": 4}, export_dir="")
    seen: dict[str, list[bool]] = {"forward": [], "backward": []}
    mlp = module.model.model.layers[0].mlp  # a module whose output is a tensor: backward hooks fire
    mlp.register_forward_pre_hook(lambda *_: seen["forward"].append(torch.backends.cuda.cudnn_sdp_enabled()))
    mlp.register_full_backward_pre_hook(lambda *_: seen["backward"].append(torch.backends.cuda.cudnn_sdp_enabled()))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    data = ChatDataModule(embedded_num_prompts=40, batch_size=2)
    trainer.fit(module, datamodule=data)
    trainer.predict(module, dataloaders=data.val_dataloader())
    assert len(seen["forward"]) > 8 and seen["backward"]
    assert set(seen["forward"]) == set(seen["backward"]) == {cudnn_attention}
    assert torch.backends.cuda.cudnn_sdp_enabled()
