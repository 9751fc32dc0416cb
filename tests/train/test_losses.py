import math

import torch

from bitlm.train import losses


class Table(torch.nn.Module):
    """A 'model' whose logits at each position are a fixed row of a table, chosen by the input token."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids):
        return self.logits[ids]


def test_token_nll_against_hand_computation():
    V = 3
    table = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    ids = torch.tensor([[0, 2, 1, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])  # only the targets 1 (after 2) and 1 (after 1) count
    nll, n = losses.token_nll(Table(table), ids, mask)

    def lse(row):
        return math.log(sum(math.exp(x) for x in row))
    # -log p(1 | 2) - log p(1 | 1)
    expect = (lse([0, 0, 3]) - 0.0) + (lse([2, 0, 0]) - 0.0)
    assert n == 2 and abs(float(nll) - expect) < 1e-6
    all_nll, all_n = losses.token_nll(Table(table), ids)
    expect_all = expect + (lse([0, 1, 2]) - 2.0)  # plus -log p(2 | 0)
    assert all_n == 3 and abs(float(all_nll) - expect_all) < 1e-6
    assert V == table.shape[1]


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # beta * ((pc - rc) - (pr - rr)) = 0.5 * (1 - (-1)) = 1.0
    assert abs(float(losses.dpo_loss(pc, pr, rc, rr, beta=0.5)) - math.log(1 + math.exp(-1.0))) < 1e-6
    assert abs(float(losses.dpo_loss(rc, rr, rc, rr, beta=0.1)) - math.log(2.0)) < 1e-6  # policy = ref
