"""Cascading and independent randomization over the registry's blocks."""

from __future__ import annotations

import pytest
import torch
from saliency_trust.networks import get_network, randomization_blocks, randomization_states, randomize_block


def _changed(a: torch.nn.Module, b: torch.nn.Module, members: tuple[str, ...]) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if any(k == m or k.startswith(m + ".") for m in members)]
    assert keys
    return any(not torch.equal(sa[k], sb[k]) for k in keys if sa[k].is_floating_point())


@pytest.mark.parametrize("arch", ["densenet121", "inception_v3"])
def test_cascading_states_randomize_head_first_and_keep_the_rest(arch):
    torch.manual_seed(0)
    trained = get_network(arch)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    blocks = randomization_blocks(arch)
    states = list(randomization_states(trained, arch, "cascading", seed=1))
    assert [n for n, _ in states] == [n for n, _ in blocks]
    for k, (_, state) in enumerate(states):
        for j, (_, members) in enumerate(blocks):
            assert _changed(trained, state, members) == (j <= k), (k, j)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # trained untouched


def test_independent_states_touch_one_block_and_are_reproducible():
    torch.manual_seed(0)
    trained = get_network("densenet121")
    blocks = randomization_blocks("densenet121")
    states = dict(randomization_states(trained, "densenet121", "independent", seed=2))
    for k, (name, _) in enumerate(blocks):
        for j, (_, members) in enumerate(blocks):
            assert _changed(trained, states[name], members) == (j == k)
    again = dict(randomization_states(trained, "densenet121", "independent", seed=2))
    for name in states:
        sa, sb = states[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the same block in cascading mode gets the same draw (seeded by block index, not by order)
    first = next(iter(randomization_states(trained, "densenet121", "cascading", seed=2)))[1]
    assert torch.equal(first.classifier.weight, states["logits"].classifier.weight)


def test_batchnorm_running_stats_reset():
    net = get_network("densenet121")
    bn = net.features.norm5
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(5.0)
        bn.weight.fill_(2.0)
    randomize_block(net, ("features.denseblock4", "features.norm5"), seed=0)
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1) and torch.all(bn.weight == 1)
    with pytest.raises(ValueError, match="no module"):
        randomize_block(net, ("features.nope",), seed=0)
    with pytest.raises(ValueError, match="cascading"):
        next(randomization_states(net, "densenet121", mode="sideways"))
