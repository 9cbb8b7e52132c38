"""Per-modality references for the fusion tests: plain torch norms, one per modality, and
the exchange written as an explicit loop over channels."""

import torch
from torch import nn

from cenfusion.fusion import ModalityBatchNorm2d, ModalityNorm


class LoopNorm(nn.Module):
    """Reference: one plain norm per modality, exchange by an explicit loop."""

    def __init__(self, norm: ModalityNorm) -> None:
        super().__init__()
        m, c = norm.num_modalities, norm.num_features
        if isinstance(norm, ModalityBatchNorm2d):
            self.norms = nn.ModuleList(
                nn.BatchNorm2d(c, eps=norm.eps, momentum=norm.momentum) for _ in range(m)
            )
            for i, bn in enumerate(self.norms):
                bn.running_mean.copy_(norm.running_mean[i])
                bn.running_var.copy_(norm.running_var[i])
        else:
            self.norms = nn.ModuleList(
                nn.InstanceNorm2d(c, eps=norm.eps, affine=True) for _ in range(m)
            )
        with torch.no_grad():
            for i, bn in enumerate(self.norms):
                bn.weight.copy_(norm.weight[i])
                bn.bias.copy_(norm.bias[i])
        self.exchange = norm.exchange
        self.threshold = norm.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = len(self.norms)
        ys = [bn(chunk) for bn, chunk in zip(self.norms, x.chunk(m))]
        if not self.exchange:
            return torch.cat(ys)
        outs = []
        for i in range(m):
            channels = []
            for c in range(ys[i].shape[1]):
                if self.norms[i].weight[c].abs() < self.threshold:
                    others = [ys[j][:, c] for j in range(m) if j != i]
                    channels.append(sum(others) / len(others))
                else:
                    channels.append(ys[i][:, c])
            outs.append(torch.stack(channels, dim=1))
        return torch.cat(outs)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()) + 1e-7)


def hand_built_norm(gammas: torch.Tensor, threshold: float = 0.1) -> ModalityBatchNorm2d:
    """Eval-mode norm with var + eps exactly 1, zero mean and bias: output = gamma * input.

    (eps stays positive: some torch versions refuse eps = 0 in ``F.batch_norm``.)
    """
    m, c = gammas.shape
    eps = 2.0**-20
    norm = ModalityBatchNorm2d(c, m, eps=eps, exchange=True, threshold=threshold).eval()
    with torch.no_grad():
        norm.weight.copy_(gammas)
        norm.running_var.fill_(1.0 - eps)
    return norm


def random_norm(num_modalities: int, channels: int = 7, seed: int = 0) -> ModalityBatchNorm2d:
    """Random statistics and affine parameters; channel 0 exchanges in every modality,
    channel 1 in modality 0 only, channel 2 in the last only, the rest nowhere."""
    g = torch.Generator().manual_seed(seed)
    norm = ModalityBatchNorm2d(channels, num_modalities, exchange=True, threshold=0.1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.weight[:, 0] = torch.linspace(-0.05, 0.05, num_modalities)
        norm.weight[0, 1] = 0.02
        norm.weight[-1, 2] = -0.09
        norm.bias.normal_(0, 0.5, generator=g)
        norm.running_mean.normal_(0, 1, generator=g)
        norm.running_var.uniform_(0.5, 2.0, generator=g)
    return norm
