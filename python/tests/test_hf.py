"""test_hf.py - moe.patch_transformers_moe on transformers' own MoE blocks
(Qwen3-MoE with and without norm_topk_prob, Mixtral, gpt-oss, DeepSeek-V3,
Llama-4),
each built from a small random config: the patched block against
transformers' forward in float64 (relative Frobenius <= 1e-2) and no worse
than transformers' own bf16 forward by more than 2x; a whole small model
patched and run; an unknown block refused by name."""
import copy

import pytest
import torch
import transformers

import moe

from conftest import rel_error

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 128, 96, 8, 2, 48


def _qwen3():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m
    cfg = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER,
                                      num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                      norm_topk_prob=True)
    return m.Qwen3MoeSparseMoeBlock(cfg)


def _qwen3_no_norm():
    block = _qwen3()
    block.gate.norm_topk_prob = False
    return block


def _mixtral():
    from transformers.models.mixtral import modeling_mixtral as m
    cfg = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER,
                                     num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return m.MixtralSparseMoeBlock(cfg)


def _gpt_oss():
    from transformers.models.gpt_oss import modeling_gpt_oss as m
    cfg = transformers.GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTER,
                                    num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return m.GptOssMLP(cfg)


def _deepseek_v3():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = transformers.DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=INTER,
                                        intermediate_size=2 * INTER, n_routed_experts=EXPERTS,
                                        num_experts_per_tok=TOP_K, n_group=4, topk_group=2,
                                        n_shared_experts=1, routed_scaling_factor=2.5,
                                        norm_topk_prob=True)
    block = m.DeepseekV3MoE(cfg)
    with torch.no_grad():  # a correction bias that changes picks
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, EXPERTS))
    return block


def _llama4():
    from transformers.models.llama4 import modeling_llama4 as m
    cfg = transformers.Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=INTER,
                                        intermediate_size_mlp=2 * INTER,
                                        num_local_experts=EXPERTS, num_experts_per_tok=1)
    return m.Llama4TextMoe(cfg)


BLOCKS = {"qwen3_moe": _qwen3, "qwen3_moe_no_norm": _qwen3_no_norm, "mixtral": _mixtral,
          "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek_v3, "llama4": _llama4}


def _out(result):
    """The hidden states of a block's output (gpt-oss returns (out, scores))."""
    return result[0] if isinstance(result, tuple) else result


def _randomize(block, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # [E][H][2I] and [E][I][H] weights ([in][out]) have fan-in shape[1].
            fan_in = p.shape[1] if p.dim() == 3 and "gate_up" in name and p.shape[1] == HIDDEN \
                or p.dim() == 3 and p.shape[2] == HIDDEN and "down" in name else p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return block.eval()


def _without_boundary_ties(block, x):
    """x without the tokens whose bf16 router logits tie at the top-k
    boundary: there libmoe takes the lower expert index (include/moe.h) and
    torch.topk may take either, so which one matches float64 is chance."""
    router = block.router if hasattr(block, "router") else block.gate
    logits = torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None))
    top = logits.float().sort(dim=-1, descending=True).values
    k = router.top_k
    return x[top[:, k - 1] != top[:, k]]


class _Wrapper(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_against_transformers(name, device):
    block64 = _randomize(BLOCKS[name](), seed=sorted(BLOCKS).index(name)).double()
    block16 = copy.deepcopy(block64).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = _without_boundary_ties(block16, torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16))
    x = x[: x.shape[0] // 2 * 2].reshape(2, -1, HIDDEN)
    with torch.no_grad():
        ref = _out(block64(x.double()))
        theirs = _out(block16(x))
        model = _Wrapper(copy.deepcopy(block16)).to(device)
        assert moe.patch_transformers_moe(model) == ["mlp"]
        result = model.mlp(x.to(device))
        ours = _out(result)
    if isinstance(result, tuple):  # gpt-oss: the routing scores too, as transformers gives
        assert torch.allclose(result[1].float().cpu(), block16(x)[1].float(), rtol=1e-2,
                              atol=1e-3)
    assert ours.shape == theirs.shape and ours.dtype == torch.bfloat16
    err, their_err = rel_error(ours, ref), rel_error(theirs, ref)
    print(f"{name} on {device}: ours {err:.2e}, transformers bf16 {their_err:.2e}")
    assert err <= 1e-2
    assert err <= 2 * their_err


def test_unknown_block_is_refused():
    class FooSparseMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList()

    model = _Wrapper(FooSparseMoeBlock())
    with pytest.raises(NotImplementedError, match="FooSparseMoeBlock"):
        moe.patch_transformers_moe(model)
    assert moe.patch_transformers_moe(model, skip_unknown=True) == []


def test_whole_model_patched():
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128,
                                      moe_intermediate_size=INTER, num_experts=EXPERTS,
                                      num_experts_per_tok=TOP_K, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    for block in model.modules():
        if type(block).__name__ == "Qwen3MoeSparseMoeBlock":
            _randomize(block, 3)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        patched = moe.patch_transformers_moe(model)
        got = model(ids).logits
    assert len(patched) == 2
    assert rel_error(got, want) <= 5e-2
