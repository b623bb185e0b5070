"""Per-task gradient norms at the shared representation from one mixed backward
(megamt.gradients.representation) vs per-task autograd references, causal LM and encoder."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from packed_batches import pack_rows, random_rows  # noqa: E402
from test_heads import T_CLS, T_NER, T_QA, example, pack  # noqa: E402
from test_heads import tiny_config as encoder_config  # noqa: E402
from test_model import VOCAB, tiny_config  # noqa: E402

from megamt.gradients.representation import RepresentationGradNorms  # noqa: E402
from megamt.model import MultitaskModel  # noqa: E402


def _check(model, batch, weights):
    T = model.num_tasks
    collector = RepresentationGradNorms(T)
    model.track_representation_grad_norms(collector)
    seen = []
    model.shared_trunk().register_forward_hook(lambda m, a, out: seen.append(out[0]))
    out = model(batch)
    count = out.count.clamp_min(1.0)
    terms = [weights[t] * out.loss_sum[t] / count[t] for t in range(T)]
    hidden = seen[-1]
    ref = []
    for t in range(T):  # reference: each weighted task loss on its own, through the same graph
        if out.count[t] == 0:
            ref.append(0.0)
            continue
        (g,) = torch.autograd.grad(terms[t], hidden, retain_graph=True)
        ref.append(float(g.double().norm()))
    collector.take(1)  # the reference's autograd.grad calls ran the tensor hook too: discard
    sum(terms).backward()  # the one mixed backward training runs
    got = collector.take(world_size=1)
    assert got.dtype == torch.float64 and got.shape == (T,)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    assert (got > 0).sum() >= 2
    # reset after take; off (enabled=False) collects nothing
    assert collector.take(1).abs().sum() == 0
    collector.enabled = False
    model(batch).loss_sum.sum().backward()
    assert collector.take(1).abs().sum() == 0
    return got


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seed", [0, 5])
def test_causal_lm_norms_match_per_task_autograd(fused, seed):
    torch.manual_seed(seed)
    model = MultitaskModel(tiny_config(fused)).train()
    batch = pack_rows(random_rows(torch.Generator().manual_seed(seed), 3, 29, 3, VOCAB), 29)  # odd length
    _check(model, batch, weights=[0.7, 1.9, 1.3])


def test_encoder_heads_norms_match_per_task_autograd():
    torch.manual_seed(0)
    model = MultitaskModel(encoder_config()).train()
    assert model.family == "encoder"
    gen = torch.Generator().manual_seed(4)
    batch = pack([[example(T_CLS, 5, gen), example(T_NER, 7, gen)], [example(T_QA, 9, gen), example(T_CLS, 4, gen)]],
                 L=17)
    _check(model, batch, weights=[1.0, 0.5, 2.0])


def test_mismatched_task_ids_are_named():
    model = MultitaskModel(tiny_config(False)).train()
    collector = RepresentationGradNorms(3)
    model.track_representation_grad_norms(collector)
    batch = pack_rows(random_rows(torch.Generator().manual_seed(1), 2, 16, 3, VOCAB), 16)
    collector.set_task_ids = lambda ids: setattr(collector, "_task_ids", ids[:, :-1])  # a wrong shape
    with pytest.raises(RuntimeError, match="does not match the batch's task_ids"):
        model(batch)
