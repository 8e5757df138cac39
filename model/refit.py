"""The refit of RANSAC's best model on its inliers, as OpenCV's ``findHomography`` does it: a normalised
least-squares DLT, then Levenberg-Marquardt on the forward reprojection errors. Batched over pairs, in float64."""

from __future__ import annotations

import torch
from torch import Tensor

from model.geometry import MIN_CORRESPONDENCES


def least_squares_dlt(src: Tensor, dst: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV's homography DLT of the points with weight 1 (its ``runKernel``), batched: (B, N, 2) x 2, (B, N).

    Each point set is normalised per axis (centroid, mean absolute deviation), and the homography is the
    eigenvector of the smallest eigenvalue of the 9x9 normal matrix, denormalised and scaled to H[2, 2] = 1.
    Starting LM from the same point as OpenCV makes it land on the same model for nearly degenerate sets too.

    Returns:
        (B, 3, 3) float64 homographies and (B,) bool, False where a spread is zero (OpenCV's failure).
    """
    src, dst, weights = src.double(), dst.double(), weights.double()
    count = weights.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
    centre_src = (src * weights.unsqueeze(-1)).sum(dim=1) / count  # (B, 2)
    centre_dst = (dst * weights.unsqueeze(-1)).sum(dim=1) / count
    spread_src = ((src - centre_src.unsqueeze(1)).abs() * weights.unsqueeze(-1)).sum(dim=1)
    spread_dst = ((dst - centre_dst.unsqueeze(1)).abs() * weights.unsqueeze(-1)).sum(dim=1)
    eps = torch.finfo(torch.float64).eps
    solved = (spread_src > eps).all(dim=1) & (spread_dst > eps).all(dim=1)
    scale_src = count / spread_src.clamp_min(eps)
    scale_dst = count / spread_dst.clamp_min(eps)
    X, Y = ((src - centre_src.unsqueeze(1)) * scale_src.unsqueeze(1)).unbind(-1)
    x, y = ((dst - centre_dst.unsqueeze(1)) * scale_dst.unsqueeze(1)).unbind(-1)
    ones, zeros = torch.ones_like(X), torch.zeros_like(X)
    row_x = torch.stack([X, Y, ones, zeros, zeros, zeros, -x * X, -x * Y, -x], dim=-1)
    row_y = torch.stack([zeros, zeros, zeros, X, Y, ones, -y * X, -y * Y, -y], dim=-1)
    rows = torch.cat([row_x, row_y], dim=1) * weights.repeat(1, 2).unsqueeze(-1)  # (B, 2N, 9)
    normal = rows.transpose(1, 2) @ rows
    normal = torch.where(solved[:, None, None], normal, torch.eye(9, dtype=normal.dtype, device=normal.device))
    H = torch.linalg.eigh(normal)[1][..., 0].view(-1, 3, 3)
    denormalise = torch.zeros_like(H)
    denormalise[:, 0, 0], denormalise[:, 1, 1], denormalise[:, 2, 2] = 1 / scale_dst[:, 0], 1 / scale_dst[:, 1], 1
    denormalise[:, 0, 2], denormalise[:, 1, 2] = centre_dst[:, 0], centre_dst[:, 1]
    normalise = torch.zeros_like(H)
    normalise[:, 0, 0], normalise[:, 1, 1], normalise[:, 2, 2] = scale_src[:, 0], scale_src[:, 1], 1
    normalise[:, 0, 2] = -centre_src[:, 0] * scale_src[:, 0]
    normalise[:, 1, 2] = -centre_src[:, 1] * scale_src[:, 1]
    H = denormalise @ H @ normalise
    return H / H[:, 2:, 2:], solved


def refine_levenberg_marquardt(H: Tensor, src: Tensor, dst: Tensor, weights: Tensor, iters: int = 10) -> Tensor:
    """Minimise the weighted squared forward reprojection errors over the 8 free entries of H (H[2, 2] = 1).

    The batched counterpart of OpenCV's ``LMSolver`` (10 iterations, as ``findHomography`` runs it after its
    refit): damping ``lambda * diag(J^T J)`` of the starting point, adapted by the gain ratio; a pair stops when
    its step or its residual falls below float32's epsilon. Works in float64.

    Args:
        H: (B, 3, 3) starting homographies with H[2, 2] = 1.
        src, dst: (B, N, 2) points.
        weights: (B, N) 0/1 weights (the inliers).
        iters: maximum number of iterations.

    Returns:
        (B, 3, 3) refined homographies in the dtype of H.
    """
    dtype = H.dtype
    src, dst, weights = src.double(), dst.double(), weights.double()
    params = H.double().flatten(1)[:, :8]
    eps = torch.finfo(torch.float64).eps
    flt_eps = torch.finfo(torch.float32).eps

    def residuals(p: Tensor, with_jacobian: bool) -> tuple[Tensor, Tensor | None]:
        x, y = src[..., 0], src[..., 1]
        w = p[:, 6:7] * x + p[:, 7:8] * y + 1
        w = torch.where(w.abs() > eps, 1 / w, torch.zeros_like(w))
        u = (p[:, 0:1] * x + p[:, 1:2] * y + p[:, 2:3]) * w
        v = (p[:, 3:4] * x + p[:, 4:5] * y + p[:, 5:6]) * w
        r = torch.stack([u - dst[..., 0], v - dst[..., 1]], dim=-1) * weights.unsqueeze(-1)  # (B, N, 2)
        if not with_jacobian:
            return r.flatten(1), None
        zeros = torch.zeros_like(x)
        row_u = torch.stack([x * w, y * w, w, zeros, zeros, zeros, -x * w * u, -y * w * u], dim=-1)
        row_v = torch.stack([zeros, zeros, zeros, x * w, y * w, w, -x * w * v, -y * w * v], dim=-1)
        J = torch.stack([row_u, row_v], dim=2) * weights[..., None, None]  # (B, N, 2, 8)
        return r.flatten(1), J.flatten(1, 2)

    r, J = residuals(params, True)
    S = (r * r).sum(dim=1)
    A = J.transpose(1, 2) @ J
    g = (J.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
    D = A.diagonal(dim1=1, dim2=2).clone()
    lam = torch.ones_like(S)
    lam_c = torch.full_like(S, 0.75)
    running = weights.sum(dim=1) >= MIN_CORRESPONDENCES
    for _ in range(iters):
        step, info = torch.linalg.solve_ex(A + torch.diag_embed(lam.unsqueeze(1) * D), g)
        step = torch.where((info == 0).unsqueeze(1), step, torch.zeros_like(step))  # singular: stop there
        trial = params - step
        r_trial, _ = residuals(trial, False)
        S_trial = (r_trial * r_trial).sum(dim=1)
        predicted = (step * (2 * g - (A @ step.unsqueeze(-1)).squeeze(-1))).sum(dim=1)
        gain = (S - S_trial) / torch.where(predicted.abs() > eps, predicted, torch.ones_like(predicted))
        # Gain above 0.75: halve the damping (to 0 below lam_c); below 0.25: raise it by nu in [2, 10].
        halved = lam * 0.5
        halved = torch.where(halved < lam_c, torch.zeros_like(halved), halved)
        t = (step * g).sum(dim=1)
        nu = ((S_trial - S) / torch.where(t.abs() > eps, t, torch.ones_like(t)) + 2).clamp(2, 10)
        diag_inv = torch.linalg.inv_ex(A)[0].diagonal(dim1=1, dim2=2).abs().amax(dim=1).nan_to_num().clamp_min(eps)
        from_zero = lam == 0
        new_lam_c = torch.where(from_zero, 1 / diag_inv, lam_c)
        raised = torch.where(from_zero, new_lam_c * nu * 0.5, lam * nu)
        new_lam = torch.where(gain > 0.75, halved, torch.where(gain < 0.25, raised, lam))
        new_lam_c = torch.where((gain < 0.25) & from_zero, new_lam_c, lam_c)
        better = running & (S_trial < S)
        params = torch.where(better.unsqueeze(1), trial, params)
        S = torch.where(better, S_trial, S)
        r_new, J_new = residuals(params, True)
        r = torch.where(better.unsqueeze(1), r_new, r)
        A = torch.where(better[:, None, None], J_new.transpose(1, 2) @ J_new, A)
        g = torch.where(better.unsqueeze(1), (J_new.transpose(1, 2) @ r_new.unsqueeze(-1)).squeeze(-1), g)
        lam = torch.where(running, new_lam, lam)
        lam_c = torch.where(running, new_lam_c, lam_c)
        running = running & (step.abs().amax(dim=1) >= flt_eps) & (r.abs().amax(dim=1) >= flt_eps)
    return torch.cat([params, torch.ones_like(params[:, :1])], dim=1).view(-1, 3, 3).to(dtype)
