"""Shared fixtures for the adapter tests: one tiny Scorer (policy + reference) and duck-typed wrappers."""

from dataclasses import dataclass

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_dir, tiny_ref_dir):
    from freeprm.engine import Scorer

    return Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5)


@dataclass
class TokenRewardsOut:
    rewards: torch.Tensor
    logp: torch.Tensor | None
    logp_ref: torch.Tensor | None


class DataclassScorer:
    """An object with only the older ``token_rewards_from_ids``, returning a dataclass (``dense_rewards`` takes it)."""

    def __init__(self, scorer):
        self.scorer, self.tokenizer = scorer, scorer.tokenizer

    def score(self, items, *, aggregate="min"):
        return self.scorer.score(items, aggregate=aggregate)

    def token_rewards_from_ids(self, input_ids, attention_mask, response_mask):
        out = self.scorer.token_rewards(input_ids, attention_mask, response_mask, with_logprobs=True)
        if not isinstance(out, tuple):
            return out
        return TokenRewardsOut(*out)


class PRMLike:
    """The ImplicitPRM duck type: ``score`` + ``token_rewards -> Tensor`` + ``version``."""

    def __init__(self, scorer, version=3):
        self.scorer, self.tokenizer, self.version = scorer, scorer.tokenizer, version

    def score(self, items, *, aggregate="min"):
        return self.scorer.score(items, aggregate=aggregate)

    def token_rewards(self, input_ids, attention_mask, response_mask):
        return self.scorer.token_rewards(input_ids, attention_mask, response_mask)


@pytest.fixture(params=["scorer", "dataclass", "prm_like"])
def any_prm(request, tiny_scorer):
    return {"scorer": tiny_scorer, "dataclass": DataclassScorer(tiny_scorer), "prm_like": PRMLike(tiny_scorer)}[request.param]
