"""The RL arithmetic of step3vl.rl.algos against numbers worked out by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from step3vl.errors import Step3VLError
from step3vl.rl import algos
from step3vl.rl.algos import (
    ADV_ESTIMATORS,
    AlgoError,
    UnknownAdvEstimatorError,
    entropy_from_logits,
    get_adv_est,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    register_adv_est,
    token_logprobs,
    value_loss,
)


def t(*rows: object) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: object, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding_whatever_it_holds():
    x = t([1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")])
    mask = t([1, 1, 1], [1, 0, 0])
    close(masked_mean(x, mask), (1 + 2 + 3 + 4) / 4)  # 2.5
    close(masked_mean(x, mask.bool(), dim=1), [2.0, 4.0])  # (1+2+3)/3, 4/1
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)  # nothing real: 0, not nan


def test_masked_whiten_population_variance():
    x = t([1.0, 2.0, 3.0, 99.0])
    mask = t([1, 1, 1, 0])
    # mean 2, var ((-1)² + 0 + 1²) / 3 = 2/3, so ±1 / sqrt(2/3) = ±1.2247449; padding → 0
    s = 1 / math.sqrt(2 / 3)
    close(masked_whiten(x, mask), [[-s, 0.0, s, 0.0]])


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_three_estimators():
    assert {"gae", "grpo", "reinforce"} <= set(ADV_ESTIMATORS)
    assert get_adv_est("grpo") is algos.grpo


def test_unknown_estimator_lists_the_registered_ones():
    with pytest.raises(UnknownAdvEstimatorError) as e:
        get_adv_est("ppo2")
    assert isinstance(e.value, Step3VLError) and isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "'ppo2'" in msg and "gae" in msg and "grpo" in msg and "reinforce" in msg
    assert not msg.startswith('"')  # printed as a sentence, not a quoted KeyError
    with pytest.raises(UnknownAdvEstimatorError):
        get_adv_est(["grpo"])  # unhashable: still the clear error


def test_register_refuses_a_duplicate_and_adds_new_names(monkeypatch):
    monkeypatch.setattr(algos, "ADV_ESTIMATORS", dict(ADV_ESTIMATORS))
    with pytest.raises(ValueError, match="already registered"):
        algos.register_adv_est("gae")(lambda **kw: kw)

    @algos.register_adv_est("zero")
    def zero(*, rewards, mask, **_):
        return torch.zeros(mask.shape), torch.zeros(mask.shape)

    assert algos.get_adv_est("zero") is zero
    assert "zero" not in ADV_ESTIMATORS  # the real registry was not touched
    assert register_adv_est is not None


# --------------------------------------------------------------------------- gae


def test_gae_gamma_lambda_one_is_reward_minus_value():
    adv, ret = get_adv_est("gae")(
        rewards=t(1.0), mask=t([1, 1, 1]), group_ids=torch.tensor([0]), values=t([0.5, 0.4, 0.2])
    )
    # γ=λ=1: A_t = R − V_t = [1−0.5, 1−0.4, 1−0.2]; returns = A + V = R everywhere
    close(adv, [[0.5, 0.6, 0.8]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_discounted():
    adv, ret = algos.gae(rewards=t(1.0), mask=t([1, 1, 1]), values=t([0.5, 0.4, 0.2]), gamma=0.9, lam=0.8)
    # δ2 = 1 + 0.9·0   − 0.2 =  0.8
    # δ1 = 0 + 0.9·0.2 − 0.4 = −0.22
    # δ0 = 0 + 0.9·0.4 − 0.5 = −0.14          γλ = 0.72
    # A2 = 0.8
    # A1 = −0.22 + 0.72·0.8   = 0.356
    # A0 = −0.14 + 0.72·0.356 = 0.11632
    close(adv, [[0.11632, 0.356, 0.8]])
    # returns = A + V = [0.61632, 0.756, 1.0]
    close(ret, [[0.61632, 0.756, 1.0]])


def test_gae_padding_changes_nothing_and_reward_goes_on_last_real_token():
    base = dict(rewards=t(1.0, 2.0), gamma=0.9, lam=0.8)
    mask = t([1, 1, 1, 0], [1, 1, 0, 0])
    v1 = t([0.5, 0.4, 0.2, 0.0], [0.0, 1.0, 0.0, 0.0])
    v2 = t([0.5, 0.4, 0.2, float("nan")], [0.0, 1.0, 123.0, float("inf")])
    adv1, ret1 = algos.gae(mask=mask, values=v1, **base)
    adv2, ret2 = algos.gae(mask=mask, values=v2, **base)
    close(adv1, adv2)
    close(ret1, ret2)
    # row 0 is the 1×3 example; row 1: δ1 = 2 − 1 = 1, δ0 = 0 + 0.9·1 − 0 = 0.9, A0 = 0.9 + 0.72·1 = 1.62
    close(adv1, [[0.11632, 0.356, 0.8, 0.0], [1.62, 1.0, 0.0, 0.0]])
    close(ret1, [[0.61632, 0.756, 1.0, 0.0], [1.62, 2.0, 0.0, 0.0]])


def test_gae_skips_a_hole_in_the_mask():
    # tool output at t=1 is not the policy's: tokens 0 and 2 are consecutive steps
    adv, _ = algos.gae(rewards=t(1.0), mask=t([1, 0, 1]), values=t([0.5, 7.0, 0.2]), gamma=0.9, lam=0.8)
    # δ2 = 1 − 0.2 = 0.8; δ0 = 0.9·0.2 − 0.5 = −0.32; A0 = −0.32 + 0.72·0.8 = 0.256
    close(adv, [[0.256, 0.0, 0.8]])


def test_gae_whiten():
    # γ=λ=1, R=1, V=[0,−1,−2]: A = [1, 2, 3] → whitened [−1, 0, 1]/sqrt(2/3); returns are not whitened
    adv, ret = algos.gae(rewards=t(1.0), mask=t([1, 1, 1]), values=t([0.0, -1.0, -2.0]), whiten=True)
    s = 1 / math.sqrt(2 / 3)
    close(adv, [[-s, 0.0, s]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_without_values_is_an_error():
    with pytest.raises(AlgoError, match="values"):
        algos.gae(rewards=t(1.0), mask=t([1, 1]), group_ids=torch.tensor([0]))


# --------------------------------------------------------------------------- grpo


def grpo_batch():
    # group 7: rewards 1,0,0,1 — group 3: 3,1,2 — group 9 alone: 5 — group 4 all equal: 0.7,0.7
    rewards = t(1.0, 3.0, 0.0, 5.0, 1.0, 0.7, 0.0, 2.0, 1.0, 0.7)
    groups = torch.tensor([7, 3, 7, 9, 3, 4, 7, 3, 7, 4])
    mask = torch.ones(10, 3)
    mask[0, 2] = 0  # a shorter answer
    return rewards, groups, mask


def test_grpo_hand_computed():
    rewards, groups, mask = grpo_batch()
    adv, ret = get_adv_est("grpo")(rewards=rewards, mask=mask, group_ids=groups, eps=1e-6)
    # group 7: mean 0.5, population std sqrt((4·0.25)/4) = 0.5 → ±0.5/(0.5 + 1e-6)
    g7 = 0.5 / (0.5 + 1e-6)
    # group 3: mean 2, std sqrt((1 + 1 + 0)/3) = sqrt(2/3) → ±1/(sqrt(2/3) + 1e-6), 0
    g3 = 1 / (math.sqrt(2 / 3) + 1e-6)
    # group 9 has one member, group 4 has std 0: both 0 (no nan)
    per_seq = [g7, g3, -g7, 0.0, -g3, 0.0, -g7, 0.0, g7, 0.0]
    expected = torch.tensor(per_seq)[:, None].repeat(1, 3)
    expected[0, 2] = 0.0  # padding
    close(adv, expected, atol=1e-6)
    close(ret, expected, atol=1e-6)
    assert not torch.isnan(adv).any()
    assert adv[5].abs().max() < 1e-6 and adv[9].abs().max() < 1e-6


def test_grpo_all_equal_exact_zero():
    adv, _ = algos.grpo(rewards=t(1.0, 1.0, 1.0), mask=torch.ones(3, 2), group_ids=torch.tensor([0, 0, 0]))
    assert torch.equal(adv, torch.zeros(3, 2))


def test_grpo_needs_group_ids():
    with pytest.raises(AlgoError, match="group_ids"):
        algos.grpo(rewards=t(1.0), mask=t([1]))


# --------------------------------------------------------------------------- reinforce (RLOO)


def test_rloo_hand_computed():
    rewards, groups, mask = grpo_batch()
    adv, ret = get_adv_est("reinforce")(rewards=rewards, mask=mask, group_ids=groups)
    # group 7 (1,0,0,1): a 1 sees others (0,0,1), mean 1/3 → 2/3; a 0 sees (1,0,1), mean 2/3 → −2/3
    # group 3 (3,1,2): 3 − (1+2)/2 = 1.5; 1 − (3+2)/2 = −1.5; 2 − (3+1)/2 = 0
    # group 9 (5) alone: baseline 0 → 5; group 4 (0.7,0.7): 0.7 − 0.7 = 0
    per_seq = [2 / 3, 1.5, -2 / 3, 5.0, -1.5, 0.0, -2 / 3, 0.0, 2 / 3, 0.0]
    expected = torch.tensor(per_seq)[:, None].repeat(1, 3)
    expected[0, 2] = 0.0
    close(adv, expected)
    close(ret, expected)


# --------------------------------------------------------------------------- policy loss

EPS = 0.2
# five tokens, ratio r and advantage A; per-token loss max(−rA, −clip(r, 0.8, 1.2)·A):
#   r=1.5 A=+1: max(−1.5, −1.2) = −1.2  clipped term active
#   r=1.5 A=−1: max( 1.5,  1.2) =  1.5  unclipped (the pessimistic bound keeps the full penalty)
#   r=0.5 A=+1: max(−0.5, −0.8) = −0.5  unclipped
#   r=0.5 A=−1: max( 0.5,  0.8) =  0.8  clipped term active
#   r=1.1 A=+2: inside the trust region: −2.2
RATIOS = [[1.5, 1.5, 0.5], [0.5, 1.1, 1.0]]
ADVS = [[1.0, -1.0, 1.0], [-1.0, 2.0, 0.0]]
PPO_MASK = [[1, 1, 1], [1, 1, 0]]  # row 1's last token is padding


def ppo_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]])
    logp = (old + torch.tensor(RATIOS).log()).requires_grad_(True)
    return logp, old, torch.tensor(ADVS), torch.tensor(PPO_MASK, dtype=torch.float32)


def test_policy_loss_token_mean_and_stats():
    logp, old, adv, mask = ppo_inputs()
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=EPS)
    close(loss, (-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5)  # −1.6/5 = −0.32
    close(stats["clip_frac"], 2 / 5)
    close(stats["ratio_mean"], (1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5)  # 1.02
    # k3 of KL(old‖new): r − 1 − log r
    k3 = [r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5, 1.1)]  # .0945, .0945, .1931, .1931, .0047
    close(stats["approx_kl"], sum(k3) / 5)  # ≈ 0.11601
    assert not any(v.requires_grad for v in stats.values())


def test_policy_loss_gradient_is_zero_exactly_where_clipped():
    logp, old, adv, mask = ppo_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps=EPS)
    loss.backward()
    # d(−rA)/dlogp = −rA / 5 on unclipped tokens; 0 on clipped tokens and padding
    close(logp.grad, [[0.0, 1.5 / 5, -0.5 / 5], [0.0, -2.2 / 5, 0.0]])


def test_policy_loss_seq_mean_token_mean():
    logp, old, adv, mask = ppo_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps=EPS, agg="seq-mean-token-mean")
    # row 0: (−1.2 + 1.5 − 0.5)/3 = −0.2/3; row 1: (0.8 − 2.2)/2 = −0.7; mean of rows
    close(loss, (-0.2 / 3 - 0.7) / 2)  # −0.383333


def test_policy_loss_clip_higher():
    logp, old, adv, mask = ppo_inputs()
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=EPS, clip_eps_high=0.6)
    # range [0.8, 1.6]: r=1.5 A=+1 is no longer clipped (−1.5); r=0.5 A=−1 still is (0.8)
    close(loss, (-1.5 + 1.5 - 0.5 + 0.8 - 2.2) / 5)  # −1.9/5 = −0.38
    close(stats["clip_frac"], 1 / 5)


def test_policy_loss_padding_changes_nothing_and_gets_no_gradient():
    logp, old, adv, mask = ppo_inputs()
    ref_loss, ref_stats = policy_loss(logp, old, adv, mask)
    for bad in (float("nan"), float("inf"), 1e6):
        lp = logp.detach().clone()
        lp[1, 2] = bad
        lp.requires_grad_(True)
        o, a = old.clone(), adv.clone()
        o[1, 2], a[1, 2] = -bad, bad
        for agg in algos.LOSS_AGGS:
            loss, stats = policy_loss(lp, o, a, mask, agg=agg)
            close(loss, policy_loss(logp, old, adv, mask, agg=agg)[0])
            loss.backward()
            assert torch.isfinite(lp.grad).all() and lp.grad[1, 2] == 0
            lp.grad = None
        for k in ref_stats:
            close(stats[k], ref_stats[k])
    close(ref_loss, -0.32)


def test_policy_loss_unknown_agg():
    logp, old, adv, mask = ppo_inputs()
    with pytest.raises(AlgoError, match="seq-mean-token-mean"):
        policy_loss(logp, old, adv, mask, agg="token-sum")


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipping():
    # ε = 0.2, V_old = 0.5 everywhere, so clip(V) ∈ [0.3, 0.7]; per token ½·max((V−R)², (Vc−R)²):
    #   V=1.0 R=1: Vc=0.7, max(0, 0.09)   → 0.045  clipped active
    #   V=0.6 R=1: Vc=0.6, max(0.16, 0.16) → 0.08   inside: not counted as clipped
    #   V=0.0 R=0: Vc=0.3, max(0, 0.09)   → 0.045  clipped active
    #   V=2.0 R=0: Vc=0.7, max(4, 0.49)   → 2.0    unclipped is larger
    values = t([1.0, 0.6, 0.0, 2.0, 9.0])
    old = t([0.5, 0.5, 0.5, 0.5, -9.0])
    returns = t([1.0, 1.0, 0.0, 0.0, 50.0])
    mask = t([1, 1, 1, 1, 0])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, (0.045 + 0.08 + 0.045 + 2.0) / 4)  # 0.5425
    close(stats["clip_frac"], 2 / 4)
    values2 = values.clone()
    values2[0, 4] = float("nan")
    close(value_loss(values2, old, returns, mask, clip_eps=0.2)[0], 0.5425)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_on_a_known_pair():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    # d = logp − ref = log 2 = 0.693147
    close(kl_penalty(logp, ref, "k1"), [[math.log(2)]])
    close(kl_penalty(logp, ref, "k2"), [[0.5 * math.log(2) ** 2]])  # 0.240227
    close(kl_penalty(logp, ref, "k3"), [[0.5 + math.log(2) - 1]])  # e^{−d} + d − 1 = 0.193147
    # swapped: d = −log 2, k1 negative; k3 = 2 − log 2 − 1 = 0.306853
    close(kl_penalty(ref, logp, "k1"), [[-math.log(2)]])
    close(kl_penalty(ref, logp, "k3"), [[1 - math.log(2)]])
    assert kl_penalty(logp, ref).shape == (1, 1)  # k3 by default
    close(kl_penalty(logp, ref), [[0.5 + math.log(2) - 1]])


def test_k3_and_k2_are_nonnegative():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all() and (kl_penalty(a, b, "k2") >= 0).all()
    assert (kl_penalty(a, a, "k3") == 0).all()


def test_kl_unknown_kind():
    with pytest.raises(AlgoError, match="k3"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


# --------------------------------------------------------------------------- logits


def test_entropy_uniform_is_log_vocab():
    V = 7
    close(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    close(entropy_from_logits(torch.full((1, 1, V), 1e4)), [[math.log(V)]])  # no overflow


def test_entropy_known_and_banned_tokens():
    # p = (0.25, 0.75): H = 0.25·ln 4 + 0.75·ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(logits), [[0.5623351]])
    # a −inf logit is a zero-probability token: (0, 0, −inf) is uniform over two → ln 2
    close(entropy_from_logits(torch.tensor([[[0.0, 0.0, float("-inf")]]])), [[math.log(2)]])
    h = entropy_from_logits(torch.tensor([[[0.0, 0.0, float("-inf")]]], dtype=torch.bfloat16))
    assert h.dtype == torch.float32


def test_token_logprobs():
    # logits (0, ln 3) → p = (0.25, 0.75)
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]], dtype=torch.bfloat16)
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert lp.dtype == torch.float32 and lp.shape == (1, 2)
    close(lp, [[math.log(0.75), math.log(0.5)]], atol=1e-2)  # bf16 logits: ln 3 is rounded
    lp32 = token_logprobs(logits.float(), torch.tensor([[1, 0]]))
    close(lp32, [[math.log(0.75), math.log(0.5)]], atol=1e-2)
    exact = token_logprobs(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    close(exact, [[math.log(0.75)]])


def test_dynamic_sampling_keeps_the_groups_whose_rollouts_disagree_first():
    from step3vl.rl.loop import _informative_groups, _keep_groups

    # 4 prompts x 3 rollouts: all right, mixed, all wrong, mixed partial-credit
    rewards = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0.25, 0.25, 0.5]
    assert _informative_groups(rewards, 3) == [False, True, False, True]
    assert _keep_groups([False, True, False, True], 2) == [1, 3]
    # fewer informative groups than wanted: topped up in sampling order, result in sampling order
    assert _keep_groups([False, True, False, True], 3) == [0, 1, 3]
    assert _keep_groups([False, False], 2) == [0, 1]


def test_oversample_below_one_is_refused_naming_the_key(tmp_path):
    from step3vl.config import ConfigError, PipelineConfig, from_dict

    with pytest.raises(ConfigError, match="'rlvr.oversample' must be >= 1"):
        from_dict(PipelineConfig, {"rlvr": {"oversample": 0.5}})
    with pytest.raises(ConfigError, match="'tracking.flush_timeout_s' must be >= 0"):
        from_dict(PipelineConfig, {"tracking": {"flush_timeout_s": -1}})


def test_iteration_metrics_report_the_share_of_responses_cut_at_the_token_limit():
    """``clip_ratio``: responses that hit ``max_response_tokens`` (finish_reason "length"), overall and per
    family; a cut response's answer is invisible to the verifier, so this is what to look at first when a
    family's reward never moves."""
    from step3vl.rl.loop import _iteration_metrics
    from step3vl.rl.rollout import Completion

    def comp(reason: str) -> Completion:
        return Completion(text="x", token_ids=[1, 2], logprobs=[0.0, 0.0], finish_reason=reason, prompt_tokens=1)

    recs = [{"task": "text_math"}] * 4 + [{"task": "ocr"}] * 2
    comps = [comp("length"), comp("length"), comp("length"), comp("stop"), comp("stop"), comp("stop")]
    row = _iteration_metrics(recs, comps, [0.0] * 6, {}, {})
    assert row["clip_ratio"] == 0.5
    assert row["text_math/clip_ratio"] == 0.75 and row["ocr/clip_ratio"] == 0.0
