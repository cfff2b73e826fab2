"""kronfluence 1.0.1: with weight sharing, pairwise scores use KFAC-expand / S.

Finding kronfluence 1 seen in the influence scores: for a Conv2d with S output
positions, ``compute_pairwise_scores`` (strategy "kfac", per-module scores) returns
``g_iᵀ (K / S + λ I)⁻¹ g_j`` where ``K = G ⊗ A`` is KFAC-expand of the per-example
averaged empirical Fisher (Grosse & Martens 2016), ``g_n`` the per-example gradients
of the summed loss. Reference: the factors and gradients built by hand; the damped
matrices inverted densely.
Run: python kronfluence_weight_sharing_scores.py
"""

import copy
import tempfile

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
)
X, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
N, damping = len(X), 1e-3


class EFTask(Task):
    def compute_train_loss(self, batch, model, sample=False):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return ["0"]


# by hand: KFAC-expand of the first conv over [W | b] (bias last) and per-example
# gradients in the same layout
conv = model[0]
a = F.unfold(X, 3, padding=1, stride=2).transpose(1, 2)  # (N, S, 18)
a = torch.cat([a, torch.ones(*a.shape[:2], 1)], 2)
S = a.shape[1]
z = conv(X)
loss = F.cross_entropy(model[1:](z), y, reduction="sum")
(g,) = torch.autograd.grad(loss, z)
g = g.flatten(2).transpose(1, 2)  # (N, S, 3)
A = torch.einsum("nsi,nsj->ij", a, a) / (N * S)
G = torch.einsum("nsi,nsj->ij", g, g) / N
grads = torch.einsum("nso,nsi->noi", g, a).reshape(N, -1)  # rvec([W | b]) per datum
K = torch.kron(G, A)
eye = torch.eye(K.shape[0])


def scores(matrix):
    return grads @ torch.linalg.solve(matrix + damping * eye, grads.T)


dtype = torch.float64
factor_args = FactorArguments(
    strategy="kfac",
    use_empirical_fisher=True,
    covariance_max_examples=None,
    activation_covariance_dtype=dtype,
    gradient_covariance_dtype=dtype,
    eigendecomposition_dtype=dtype,
)
score_args = ScoreArguments(
    damping_factor=damping,
    compute_per_module_scores=True,
    per_sample_gradient_dtype=dtype,
    precondition_dtype=dtype,
    score_dtype=dtype,
)
with tempfile.TemporaryDirectory() as tmp:
    task = EFTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    an = Analyzer("f", wrapped, task, cpu=True, disable_tqdm=True, output_dir=tmp)
    data = TensorDataset(X, y)
    an.fit_all_factors("k", data, per_device_batch_size=N, factor_args=factor_args)
    an.compute_pairwise_scores(
        "s", "k", data, data, N, per_device_train_batch_size=N, score_args=score_args
    )
    kronfluence = an.load_pairwise_scores("s")["0"]


def rel(P, Q):
    return ((P - Q).norm() / Q.norm()).item()


print(f"S = {S}, λ = {damping}")
print(f"vs g_iᵀ (K + λI)⁻¹ g_j  (KFAC-expand): {rel(kronfluence, scores(K)):.3e}")
print(f"vs g_iᵀ (K/S + λI)⁻¹ g_j:              {rel(kronfluence, scores(K / S)):.3e}")
