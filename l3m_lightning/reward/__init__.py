"""Reward-model training: Bradley–Terry on preference pairs, exported for the ``reward_model`` constraint."""

from l3m_lightning.reward.data import PreferenceDataModule, preference_pair, split_hh_dialogue
from l3m_lightning.reward.module import RewardModelModule
from constraints.pooled_reward_model import PooledRewardConfig, PooledRewardModel

__all__ = ["PooledRewardConfig", "PooledRewardModel", "PreferenceDataModule", "RewardModelModule", "preference_pair", "split_hh_dialogue"]
