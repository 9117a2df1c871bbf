"""The CLI both commands share: the data is tokenised with the model's tokenizer, linked, not set twice."""

from __future__ import annotations

import pytest

from l3m_lightning.cli_base import build_cli
from l3m_lightning.data import ChatDataModule
from l3m_lightning.module import L3MModule

pytestmark = pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")


def test_policy_tokenizer_and_trust_are_linked_to_the_data(tmp_path):
    from l3m_lightning.embedded.tokenizer import embedded_tokenizer_path

    folder = str(embedded_tokenizer_path())
    cli = build_cli(L3MModule, ChatDataModule, run=False, args=[
        "--model.policy.tokenizer_name_or_path", folder, "--model.policy.trust_remote_code", "true", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
        "--model.policy.config", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
    ])
    assert cli.config.data.tokenizer == folder and cli.config.data.trust_remote_code is True


def test_a_model_without_tokenizer_options_is_refused():
    import lightning as L

    class NoTokenizer(L.LightningModule):
        def __init__(self, width: int = 1) -> None:
            super().__init__()

    with pytest.raises(TypeError, match="NoTokenizer has none of the tokenizer options"):
        build_cli(NoTokenizer, ChatDataModule, run=False, args=[])
