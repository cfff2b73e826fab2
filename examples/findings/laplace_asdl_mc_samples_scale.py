"""Finding L2: ASDL's MC Fisher (via laplace-torch) is 1/M too small for M samples.

KronLaplace with ``AsdlGGN(stochastic=True)`` forwards ``asdl_fisher_kwargs`` to ASDL's
``FisherConfig`` (``n_mc_samples``). asdfghjkl 0.1a4 (``asdl/fisher.py``:
``FisherMCCrossEntropy._fisher_loop`` and ``FisherMCMSE._fisher_loop``) divides each
sampled NLL by M *before* the per-sample outer product, so the gradient factor is
Σ_m (g_m/M)(g_m/M)ᵀ = (1/M)·[(1/M) Σ_m g_m g_mᵀ]: the MC Fisher divided by M. The
curvlinops backend with the same ``mc_samples`` converges to the type-2 factors.

Run: python examples/findings/laplace_asdl_mc_samples_scale.py
"""

import torch
from laplace import KronLaplace
from laplace.curvature import AsdlGGN, CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
X, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
loader = DataLoader(TensorDataset(X, y), batch_size=6)


def last_block(backend, backend_kwargs=None, kron_kwargs=None):
    """Fit KronLaplace and return the last layer's weight block G ⊗ A."""
    lap = KronLaplace(
        model,
        "classification",
        backend=backend,
        backend_kwargs=backend_kwargs,
        asdl_fisher_kwargs=kron_kwargs,
    )
    lap.fit(loader)
    index = [i for i, p in enumerate(lap.params) if p is model[2].weight][0]
    G, A = lap.H_facs.kfacs[index]
    return torch.kron(G, A)


exact = last_block(CurvlinopsGGN)  # type-2 KFAC
for M in (1, 16, 256, 1024):
    asdl = last_block(AsdlGGN, {"stochastic": True}, {"n_mc_samples": M, "seed": 0})
    cl = last_block(CurvlinopsGGN, {"stochastic": True}, {"mc_samples": M, "seed": 0})
    print(
        f"M={M:5d}  trace ratio to type-2: ASDL {asdl.trace() / exact.trace():.4f}, "
        f"M*ASDL {M * asdl.trace() / exact.trace():.4f}, "
        f"curvlinops {cl.trace() / exact.trace():.4f}"
    )
