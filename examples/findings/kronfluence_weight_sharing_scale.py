"""kronfluence 1.0.1: with weight sharing, KFAC is KFAC-expand divided by S.

factor/eigen.py divides the activation *and* the gradient covariance by their row
counts (N·S for a Conv2d with S output positions or a Linear applied to S tokens),
so G = (1/(N·S)) Σ_{n,s} g gᵀ where KFAC-expand (Grosse & Martens 2016; Eschenhagen
et al. 2023) has G = (1/N) Σ_{n,s} g gᵀ for the per-example-averaged Fisher. The
EKFAC eigenvalues of the same library (LambdaTracker) are per-example sums divided by
N, so kronfluence's KFAC and EKFAC disagree in scale by S for such layers.
Reference: expand factors built by hand for the empirical Fisher.
Run: python kronfluence_weight_sharing_scale.py
"""

import tempfile

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
)
X, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
N = len(X)


class EFTask(Task):
    def compute_train_loss(self, batch, model, sample=False):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


# hand-made KFAC-expand for the first conv (empirical Fisher, per-example average)
conv = model[0]
a = F.unfold(X, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
a = torch.cat([a, torch.ones(len(a), 1)], 1)
S = a.shape[0] // N
z = conv(X)
loss = F.cross_entropy(model[1:](z), y, reduction="sum")
(g,) = torch.autograd.grad(loss, z)
g = g.permute(0, 2, 3, 1).reshape(-1, 3)
A_expand, G_expand = a.T @ a / (N * S), g.T @ g / N

args = FactorArguments(
    strategy="kfac",
    use_empirical_fisher=True,
    activation_covariance_dtype=torch.float64,
    gradient_covariance_dtype=torch.float64,
)
with tempfile.TemporaryDirectory() as tmp:
    task = EFTask()
    wrapped = prepare_model(__import__("copy").deepcopy(model), task)
    an = Analyzer("f", wrapped, task, cpu=True, disable_tqdm=True, output_dir=tmp)
    an.fit_all_factors("k", TensorDataset(X, y), per_device_batch_size=N, factor_args=args)
    f = an.load_all_factors("k")
U_A, l_A = f["activation_eigenvectors"]["0"], f["activation_eigenvalues"]["0"]
U_G, l_G = f["gradient_eigenvectors"]["0"], f["gradient_eigenvalues"]["0"]
A_kf, G_kf = (U_A * l_A) @ U_A.T, (U_G * l_G) @ U_G.T
ratio = torch.kron(G_kf, A_kf).norm() / torch.kron(G_expand, A_expand).norm()
print(f"S = {S}: kronfluence KFAC / KFAC-expand = {ratio:.4f} (1/S = {1 / S:.4f})")
