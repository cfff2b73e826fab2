"""Finding L5: ``KronLaplace(damping=True)`` has no effect on the posterior precision.

laplace-torch documents a damped Kronecker posterior: ``KronLaplace``'s docstring says
"Damping can be enabled by setting `damping=True`", and ``KronDecomposed`` (parameter
``damping``: "use dampen approximation mixing prior and Kron partially
multiplicatively") then computes the eigenvalues of a Kronecker group with prior
precision δ as ``(l1 + √δ)(l2 + √δ)`` instead of ``l1·l2 + δ``
(laplace/utils/matrix.py: ``logdet``, ``_bmm``, ``diag``, ``to_matrix``).

``KronLaplace.fit`` stores ``self.H = H_facs.decompose(damping=True)``, but
``posterior_precision`` is ``self.H * self._H_factor + self.prior_precision`` and both
``KronDecomposed.__mul__`` and ``KronDecomposed.__add__`` build a new
``KronDecomposed`` without passing ``damping`` on (default ``False``). Every quantity
read from the posterior precision (``log_det_posterior_precision``, the log marginal
likelihood, ``functional_variance``, ``sample``) is therefore the undamped
``K + δI`` whatever ``damping`` says.

Run: python examples/findings/laplace_kron_damping_ignored.py
"""

import torch
from laplace import KronLaplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))
X, Y = torch.randn(6, 3), torch.randn(6, 2)
loader = DataLoader(TensorDataset(X, Y), batch_size=3)
delta = 0.5

for damping in (False, True):
    lap = KronLaplace(model, "regression", prior_precision=delta, damping=damping)
    lap.fit(loader)
    product = sum(
        torch.logdet(torch.kron(Q, H) + delta * torch.eye(len(Q) * len(H)))
        for Q, H in lap.H_facs.kfacs
    )
    root = delta**0.5
    per_factor = sum(
        torch.logdet(torch.kron(Q + root * torch.eye(len(Q)), H + root * torch.eye(len(H))))
        for Q, H in lap.H_facs.kfacs
    )
    print(
        f"damping={damping}: lap.H.damping = {lap.H.damping}, "
        f"posterior_precision.damping = {lap.posterior_precision.damping}; "
        f"log_det_posterior_precision = {lap.log_det_posterior_precision.item():.6f} "
        f"(product K + δI: {product.item():.6f}, damped (Q + √δI) ⊗ (H + √δI): "
        f"{per_factor.item():.6f})"
    )
