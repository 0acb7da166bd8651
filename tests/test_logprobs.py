"""Chunked log-probs, entropy and cross-entropy (nanoseek.train.logprobs) against the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import Transformer, get_preset
from nanoseek.train.logprobs import causal_lm_loss, cross_entropy_sum, token_logprobs

V, D = 97, 16


def plain(hidden, weight, targets, temperature):
    logp_all = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def leaves(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, D, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(V, D, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.randint(0, V, (3, 11), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_bytes", [4 * V * 5, 1 << 30])  # 5 tokens a chunk (recomputed); one chunk (kept)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_full_logits(chunk_bytes: int, temperature: float) -> None:
    hidden, weight, targets = leaves()
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.randn(3, 11, dtype=torch.float64, generator=g), torch.randn(3, 11, dtype=torch.float64)

    ref_logp, ref_ent = plain(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum(), [hidden, weight])
    logp, ent = token_logprobs(hidden, weight, targets, temperature, chunk_bytes=chunk_bytes)
    grads = torch.autograd.grad((logp * w_logp).sum() + (ent * w_ent).sum(), [hidden, weight])

    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_gradient_of_the_log_probs_alone_and_selected_positions() -> None:
    hidden, weight, targets = leaves(2)
    where = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.5
    ref_logp, ref_ent = plain(hidden, weight, targets, 1.3)
    ref = torch.autograd.grad((ref_logp * where).sum(), [hidden, weight])
    logp, ent = token_logprobs(hidden, weight, targets, 1.3, where=where, chunk_bytes=4 * V * 3)
    got = torch.autograd.grad(logp.sum(), [hidden, weight])
    torch.testing.assert_close(logp, ref_logp * where, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent * where, atol=1e-6, rtol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [4 * V * 4, 1 << 30])
def test_gradient_of_the_entropy_alone_and_a_second_backward(chunk_bytes: int) -> None:
    """The backward works in place on its buffers: the entropy's own path, and the kept one-chunk logits
    (a second backward through the same graph would see them changed)."""
    hidden, weight, targets = leaves(4)
    _, ref_ent = plain(hidden, weight, targets, 0.9)
    ref = torch.autograd.grad(ref_ent.sum(), [hidden, weight])
    _, ent = token_logprobs(hidden, weight, targets, 0.9, chunk_bytes=chunk_bytes)
    for _ in range(2):
        got = torch.autograd.grad(ent.sum(), [hidden, weight], retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_cross_entropy_ignores_minus_100_like_torch() -> None:
    hidden, weight, targets = leaves(4)
    targets[0, :4] = -100
    ref = F.cross_entropy((hidden @ weight.T).view(-1, V), targets.view(-1), ignore_index=-100, reduction="sum")
    ce = cross_entropy_sum(hidden, weight, targets, chunk_bytes=4 * V * 4)
    torch.testing.assert_close(ce, ref, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(ce, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_causal_lm_loss_equals_the_loss_of_the_models_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=128, n_layers=2)).double()
    ids = torch.randint(0, 128, (2, 9))
    targets = torch.randint(0, 128, (2, 9))
    targets[1, :3] = -100
    # model.loss casts logits to float32; the float64 reference is the cross-entropy of the float64 logits
    ref = F.cross_entropy(model(ids).view(-1, 128), targets.view(-1), ignore_index=-100, reduction="sum")
    ref_grad = torch.autograd.grad(ref, [model.output_weight, model.layers[0].attn.wq.weight])
    ce, _ = causal_lm_loss(model, ids, targets)
    grad = torch.autograd.grad(ce, [model.output_weight, model.layers[0].attn.wq.weight])
    torch.testing.assert_close(ce, ref, atol=1e-6, rtol=0)
    for a, b in zip(grad, ref_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    mean, _ = causal_lm_loss(model, ids, targets, reduction="mean")
    torch.testing.assert_close(mean, ref / (targets != -100).sum(), atol=1e-6, rtol=0)


def test_no_tensor_of_all_the_logits_is_kept_for_backward() -> None:
    """What autograd saves holds at most one chunk's logits, however many tokens there are."""
    hidden, weight, targets = leaves()
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    chunk_tokens = 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, weight, targets, chunk_bytes=4 * V * chunk_tokens)
    assert max(sizes) < targets.numel() * V / 2, sizes  # the full logits would be 33 x 97
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain(hidden, weight, targets, 1.0)
    assert max(sizes) >= targets.numel() * V  # the plain path does keep them (the check above can fail)


def test_under_bf16_autocast_the_matmul_is_bf16_like_the_plain_path():
    """Autocast: the chunked path multiplies in bf16 as F.linear under autocast does; the gradient of the
    float32 master weight comes back in float32."""
    hidden, weight, targets = (t.detach().float() if t.is_floating_point() else t for t in leaves(5))
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ref = torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        logp, _ = token_logprobs(hidden, weight, targets, chunk_bytes=4 * V * 4)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    (g_ref,) = torch.autograd.grad(ref.sum(), [weight])
    (g,) = torch.autograd.grad(logp.sum(), [weight])
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, atol=0.05, rtol=0.02)


def test_the_backward_makes_no_weight_sized_temporary() -> None:
    """Over several chunks the weight's gradient is the one [vocab, d] tensor the backward creates: each chunk's
    share is added a tile of rows at a time (a whole chunk's product would be a second and a third, per chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightSized(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.count += sum(
                torch.is_tensor(t) and t.shape == (V, D) for t in (out if isinstance(out, tuple) else [out])
            )
            return out

    hidden, weight, targets = leaves(6)
    logp, ent = token_logprobs(hidden, weight, targets, chunk_bytes=4 * V * 4)  # 9 chunks
    with CountWeightSized() as counter:
        torch.autograd.grad(logp.sum() + ent.sum(), [weight])
    assert counter.count == 1
