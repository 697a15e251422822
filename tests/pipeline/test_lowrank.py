"""Low-rank compensation: EoRA, SVD, ESPACE, rank budgets, factor storage (DESIGN section 5)."""
from __future__ import annotations

import itertools

import pytest
import torch

from lpc.formats import LpcError, get_format
from lpc.pipeline.compensation.espace import (
    espace_compress, espace_projection, espace_residual, espace_statistic, projection_error,
)
from lpc.pipeline.compensation.lowrank import (
    allocate_ranks, eora, eora_decompose, output_error, quantize_factors, svd_decompose, svd_lowrank,
)


# ---------------------------------------------------------------- seeded generators

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, n_in: int, seed: int, latent: int = 16) -> torch.Tensor:
    """X (n, n_in) fp32: a rank-`latent` signal plus 10% noise, lognormal channel scales."""
    g = _gen(seed)
    X = torch.randn(n, latent, generator=g) @ torch.randn(latent, n_in, generator=g)
    X = X + 0.1 * torch.randn(n, n_in, generator=g)
    return X * torch.exp(0.5 * torch.randn(n_in, generator=g))


def autocorrelation(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def student_t(shape: tuple[int, int], seed: int, df: int = 5) -> torch.Tensor:
    """Heavy-tailed weights like an LLM's: z / sqrt(chi2_df / df), times 0.02."""
    g = _gen(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df, *shape), generator=g).square().sum(0)
    return 0.02 * z / (chi2 / df).sqrt()


def nvfp4_layer(out: int = 256, n_in: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """dW = W - nvfp4(W) of a Student-t weight, and C of correlated inputs."""
    W = student_t((out, n_in), seed)
    dW = W - get_format("nvfp4").fake_quantize(W)
    return dW, autocorrelation(correlated_inputs(2048, n_in, seed + 1))


def relative_errors(ranks=(4, 8, 16)) -> dict[int, tuple[float, float]]:
    """{rank: (EoRA, SVD)} relative output error trace(E C E^T) / trace(dW C dW^T)."""
    dW, C = nvfp4_layer()
    base = output_error(dW, C)
    eo, sv = eora_decompose(dW, C), svd_decompose(dW)
    rel = {}
    for r in ranks:
        (B, A), (Bs, As) = eo.factors(r), sv.factors(r)
        rel[r] = (output_error(dW - B @ A, C) / base, output_error(dW - Bs @ As, C) / base)
    return rel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------- EoRA

@pytest.mark.parametrize("rank", [1, 5, 24])
def test_identity_covariance_gives_truncated_svd(rank):
    dW = torch.randn(24, 40, generator=_gen(1))
    B, A = eora(dW, torch.eye(40), rank)
    Bs, As = svd_lowrank(dW, rank)
    assert B.shape == (24, rank) and A.shape == (rank, 40)
    assert B.dtype == A.dtype == torch.float32
    assert _rel(B @ A, Bs @ As) < 1e-5


@pytest.mark.parametrize("factor", [1e-6, 3.0, 1e4])
def test_scaling_covariance_changes_nothing(factor):
    dW = torch.randn(32, 48, generator=_gen(2))
    C = autocorrelation(correlated_inputs(256, 48, 3))
    B, A = eora(dW, C, 6)
    Bf, Af = eora(dW, C * factor, 6)
    assert _rel(Bf @ Af, B @ A) < 1e-5


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_reproduces_dW(shape):
    dW = torch.randn(*shape, generator=_gen(4))
    C = autocorrelation(correlated_inputs(512, shape[1], 5, latent=shape[1]))
    B, A = eora(dW, C, min(shape))
    assert _rel(B @ A, dW) < 1e-5


def test_output_error_eora_below_svd_below_none():
    rel = relative_errors()
    for r, (eo, sv) in rel.items():
        assert eo < sv < 1.0, (r, eo, sv)
    assert rel[16][0] < 0.5 * rel[16][1]  # correlated inputs: whitening wins by far, not by rounding


def test_residual_errors_are_the_output_error_at_each_rank():
    dW, C = nvfp4_layer(64, 96, seed=6)
    dec = eora_decompose(dW, C)
    curve = dec.residual_errors(12)
    assert len(curve) == 13
    assert curve[0] == pytest.approx(output_error(dW, C), rel=1e-9)
    for r in (1, 4, 12):
        B, A = dec.factors(r)
        assert output_error(dW - B @ A, C) == pytest.approx(curve[r], rel=1e-5)
    steps = [a - b for a, b in zip(curve, curve[1:])]
    assert all(s >= 0 for s in steps) and all(a >= b for a, b in zip(steps, steps[1:]))
    fro = svd_decompose(dW).residual_errors(3)
    Bs, As = svd_lowrank(dW, 3)
    assert fro[3] == pytest.approx((dW - Bs @ As).double().square().sum().item(), rel=1e-5)


def test_svd_factors_are_balanced():
    B, A = svd_lowrank(torch.randn(30, 20, generator=_gen(7)), 5)
    # B^T B = A A^T = diag(s): the error is split evenly, which keeps both factors quantizable
    assert torch.allclose(B.T @ B, A @ A.T, atol=1e-4)
    assert torch.allclose(B.T @ B, torch.diag(torch.diag(B.T @ B)), atol=1e-4)


def test_rank_deficient_covariance_has_no_nan_and_zero_output_error():
    g = _gen(8)
    X = torch.randn(200, 10, generator=g) @ torch.randn(10, 48, generator=g)  # rank 10
    X[:, :5] = 0.0  # and some channels never fire at all
    C = autocorrelation(X)
    dW = torch.randn(20, 48, generator=_gen(9))
    dec = eora_decompose(dW, C)
    B, A = dec.factors(20)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert output_error(dW - B @ A, C) < 1e-8 * output_error(dW, C)
    # ranks beyond the rank of dW S (here 10) add zero columns, not noise
    assert B[:, 10:].abs().max() == 0 and A[10:].abs().max() == 0
    assert dec.residual_errors()[10] < 1e-6 * dec.residual_errors()[0]  # fp32 rounding of C only


def test_eps_rel_drops_small_eigenvalues_into_the_floor():
    X = correlated_inputs(400, 32, 10, latent=32)
    C = autocorrelation(X * torch.logspace(0, -4, 32))  # eigenvalues spread over ~8 decades
    dW = torch.randn(16, 32, generator=_gen(11))
    coarse = eora_decompose(dW, C, eps_rel=1e-4)
    assert coarse.floor > 0 and coarse.unwhiten.shape[0] < 32
    assert coarse.residual_errors()[-1] == pytest.approx(coarse.floor)
    assert eora_decompose(dW, C).floor < coarse.floor


# ---------------------------------------------------------------- ESPACE

def _block_covariance(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C_X (64, 64): 48 loud channels and 16 quiet ones in two independent correlated groups,
    channels shuffled; Fisher (64,): gradient importance sits on the 16 quiet channels."""
    g = _gen(seed)

    def group(k: int, scale: float) -> torch.Tensor:
        A = torch.randn(k, 4, generator=g, dtype=torch.float64)
        return (A @ A.T + 0.1 * torch.eye(k, dtype=torch.float64)) * scale**2

    perm = torch.randperm(64, generator=g)
    Cx = torch.block_diag(group(48, 2.0), group(16, 1.0))[perm][:, perm]
    fisher = torch.where(perm >= 48, 1.0, 0.01).to(torch.float64)
    return Cx.float(), fisher.float()


@pytest.mark.parametrize("stat", ["act", "weight", "grad", "grad_matrix"])
@pytest.mark.parametrize("normalize", [False, True])
def test_espace_projection_has_orthonormal_columns(stat, normalize):
    Cx = autocorrelation(correlated_inputs(300, 40, 12))
    W = torch.randn(24, 40, generator=_gen(13))
    fisher = torch.rand(40, generator=_gen(14))
    Cg = torch.diag(fisher) if stat == "grad_matrix" else fisher
    P = espace_projection(stat.split("_")[0], 12, Cx, W=W, C_g=Cg, normalize_rows=normalize)
    assert P.shape == (40, 12) and P.dtype == torch.float32
    assert torch.allclose(P.T @ P, torch.eye(12), atol=1e-5)


def test_espace_full_rank_is_exact():
    Cx = autocorrelation(correlated_inputs(300, 40, 15))
    W, dW = torch.randn(24, 40, generator=_gen(16)), torch.randn(24, 40, generator=_gen(17))
    P = espace_projection("act", 40, Cx)
    B, A = espace_residual(dW, P)
    WP, Pt = espace_compress(W, P)
    assert B.shape == (24, 40) and torch.equal(A, Pt)
    assert _rel(B @ A, dW) < 1e-5 and _rel(WP @ Pt, W) < 1e-5


def test_espace_act_minimizes_input_error():
    Cx = autocorrelation(correlated_inputs(300, 40, 18))
    P = espace_projection("act", 8, Cx)
    evals = torch.linalg.eigvalsh(Cx.double())
    assert projection_error(P, Cx) == pytest.approx(evals[:-8].sum().item(), rel=1e-4)
    Q, _ = torch.linalg.qr(torch.randn(40, 8, generator=_gen(19)))
    assert projection_error(P, Cx) < projection_error(Q, Cx)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_aware_espace_beats_activation_espace(seed):
    Cx, fisher = _block_covariance(seed)
    for rank in (2, 4, 8, 16):
        act = projection_error(espace_projection("act", rank, Cx), Cx, fisher)
        grad = projection_error(espace_projection("grad", rank, Cx, C_g=fisher), Cx, fisher)
        assert grad <= act * (1 + 1e-6), (rank, grad, act)
    act4 = projection_error(espace_projection("act", 4, Cx), Cx, fisher)
    grad4 = projection_error(espace_projection("grad", 4, Cx, C_g=fisher), Cx, fisher)
    assert grad4 < 0.3 * act4  # act keeps the loud group, grad the important one
    assert torch.allclose(espace_statistic("grad", Cx, C_g=fisher),  # Fisher vector = its diagonal matrix
                          espace_statistic("grad", Cx, C_g=torch.diag(fisher)))


def test_normalized_act_ignores_channel_scales():
    Cx = autocorrelation(correlated_inputs(300, 40, 20))
    s = torch.exp(2 * torch.randn(40, generator=_gen(21)))
    s[3] = 1e3  # an outlier channel
    P = espace_projection("act", 6, Cx, normalize_rows=True)
    Ps = espace_projection("act", 6, Cx * s[:, None] * s[None, :], normalize_rows=True)
    assert torch.allclose(P @ P.T, Ps @ Ps.T, atol=1e-4)
    raw = espace_projection("act", 1, Cx * s[:, None] * s[None, :])
    assert raw[3, 0].abs() > 0.99  # without normalization the outlier owns the top direction


# ---------------------------------------------------------------- factor storage

def test_quantize_factors_bf16_default_and_fp32():
    B, A = svd_lowrank(torch.randn(64, 128, generator=_gen(22)), 16)
    s = quantize_factors(B, A)
    assert s.fmt == "bf16" and s.bits == 16 * (64 * 16 + 16 * 128)
    assert torch.equal(s.B, B.bfloat16().float()) and torch.equal(s.A, A.bfloat16().float())
    assert s.packed["lora_A"].dtype == torch.bfloat16
    f = quantize_factors(B, A, "fp32")
    assert torch.equal(f.B, B) and f.bits == 32 * (64 * 16 + 16 * 128)


@pytest.mark.parametrize("fmt, bits_per_elem, min_sqnr_db", [("fp8_e4m3", 8, 25.0), ("nvfp4", 4.5, 8.0)])
def test_quantize_factors_through_formats(fmt, bits_per_elem, min_sqnr_db):
    dW, C = nvfp4_layer(64, 128, seed=23)
    B, A = eora(dW, C, 16)
    s = quantize_factors(B, A, fmt)
    f = get_format(fmt)
    assert torch.equal(s.B, f.fake_quantize(B)) and torch.equal(s.A, f.fake_quantize(A))
    elems = B.numel() + A.numel()
    scale_bits = 32 * (64 + 16) if fmt == "fp8_e4m3" else 32 * 2  # per-row / per-tensor fp32 scales
    assert s.bits == bits_per_elem * elems + scale_bits
    prod = B.double() @ A.double()
    sqnr = 10 * torch.log10(prod.square().sum() / (prod - s.B.double() @ s.A.double()).square().sum())
    assert sqnr > min_sqnr_db
    assert output_error(dW - s.B @ s.A, C) < output_error(dW, C)


def test_quantize_factors_counts_padding():
    B, A = svd_lowrank(torch.randn(32, 64, generator=_gen(24)), 4)
    s = quantize_factors(B, A, "nvfp4")
    assert s.bits == s.packed["lora_B"].storage_bits() + s.packed["lora_A"].storage_bits()
    assert s.bits > 4.5 * (B.numel() + A.numel())  # B's rows of 4 pad to a block of 16


# ---------------------------------------------------------------- rank budgets

def _convex_curve(g: torch.Generator, n: int) -> list[float]:
    s2 = (torch.rand(n, generator=g, dtype=torch.float64) * 10).sort(descending=True).values
    return torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)]).tolist()


def _brute_force(curves, costs, budget, cap) -> float:
    names = sorted(curves)
    return min(sum(curves[n][r] for n, r in zip(names, ranks))
               for ranks in itertools.product(range(cap + 1), repeat=len(names))
               if sum(costs[n] * r for n, r in zip(names, ranks)) <= budget)


def test_allocation_matches_brute_force_with_equal_costs():
    g = _gen(25)
    for _ in range(20):
        curves = {f"l{i}": _convex_curve(g, 5) for i in range(3)}
        costs = dict.fromkeys(curves, 7)
        for budget in range(0, 7 * 16, 5):
            ranks = allocate_ranks(curves, costs, budget, 5)
            assert sum(costs[n] * r for n, r in ranks.items()) <= budget
            got = sum(curves[n][r] for n, r in ranks.items())
            assert got == pytest.approx(_brute_force(curves, costs, budget, 5), rel=1e-12, abs=1e-12)


def test_allocation_with_unequal_costs_is_within_one_step_of_optimal():
    g = _gen(26)
    for _ in range(20):
        curves = {f"l{i}": _convex_curve(g, 4) for i in range(3)}
        costs = {n: int(c) for n, c in zip(curves, torch.randint(1, 6, (3,), generator=g))}
        biggest_step = max(c[0] - c[1] for c in curves.values())
        for budget in range(0, 40, 3):
            ranks = allocate_ranks(curves, costs, budget, 4)
            spent = sum(costs[n] * r for n, r in ranks.items())
            assert spent <= budget
            # nothing affordable that removes error is left on the table
            assert all(ranks[n] == 4 or costs[n] > budget - spent or curves[n][ranks[n] + 1] >= curves[n][ranks[n]]
                       for n in curves)
            got = sum(curves[n][r] for n, r in ranks.items())
            assert got <= _brute_force(curves, costs, budget, 4) + biggest_step


def test_allocation_spends_the_budget_exactly_when_it_can():
    curves = {n: _convex_curve(_gen(27 + i), 32) for i, n in enumerate(["a", "b", "c"])}
    ranks = allocate_ranks(curves, dict.fromkeys(curves, 10), 370, 32)
    assert sum(ranks.values()) * 10 == 370


def test_allocation_ties_go_to_the_smallest_name_whatever_the_order():
    curve = [4.0, 2.0, 1.0]
    for order in (["b", "a"], ["a", "b"]):
        ranks = allocate_ranks({n: curve for n in order}, {n: 5 for n in order}, 5, 2)
        assert ranks == {"a": 1, "b": 0}


def test_allocation_climbs_over_flat_stretches_and_accepts_a_callable():
    curves = {"flat": [10.0, 10.0, 0.0], "slow": [10.0, 9.0, 8.5]}
    ranks = allocate_ranks(lambda n: curves[n], {"flat": 1, "slow": 1}, 2, {"flat": 2, "slow": 2})
    assert ranks == {"flat": 2, "slow": 0}  # one-rank greedy would buy "slow" first and end at 18.5


def test_allocation_from_real_decompositions():
    layers = {f"m{i}": nvfp4_layer(32, 48, seed=30 + i) for i in range(3)}
    decs = {n: eora_decompose(dW, C) for n, (dW, C) in layers.items()}
    curves = {n: d.residual_errors(8) for n, d in decs.items()}
    ranks = allocate_ranks(curves, dict.fromkeys(layers, 80), 80 * 12, 8)
    assert sum(ranks.values()) == 12
    realized = 0.0
    for n, (dW, C) in layers.items():
        if ranks[n]:
            B, A = decs[n].factors(ranks[n])
            dW = dW - B @ A
        realized += output_error(dW, C)
    assert realized == pytest.approx(sum(curves[n][r] for n, r in ranks.items()), rel=1e-5)


# ---------------------------------------------------------------- bad input

def _good():
    return torch.randn(8, 12, generator=_gen(40)), autocorrelation(correlated_inputs(50, 12, 41))


@pytest.mark.parametrize("rank, match", [(0, "rank 0 is out of range"), (-2, "rank -2 is out of range"),
                                         (9, r"rank 9 is out of range.*1 <= rank <= 8"),
                                         (2.5, "rank must be an integer"), (True, "rank must be an integer")])
def test_bad_rank_raises(rank, match):
    dW, C = _good()
    for call in (lambda: eora(dW, C, rank), lambda: svd_lowrank(dW, rank)):
        with pytest.raises(LpcError, match=match):
            call()


def test_bad_matrices_raise():
    dW, C = _good()
    cases = [
        (lambda: eora(dW, C[:10, :10], 2), r"C has shape \(10, 10\) but dW has shape \(8, 12\)"),
        (lambda: eora(dW, C.clone().fill_(float("nan")), 2), "C holds NaN or inf"),
        (lambda: eora(dW, torch.zeros(12, 12), 2), "no positive eigenvalue"),
        (lambda: eora(dW, C + torch.triu(torch.ones(12, 12)), 2), "C is not symmetric"),
        (lambda: eora(dW[0], C, 2), "dW must be a non-empty 2-D matrix"),
        (lambda: eora(dW.int(), C, 2), "dW must be a floating-point"),
        (lambda: eora(dW, C, 2, eps_rel=-1.0), "eps_rel must be a number in"),
        (lambda: output_error(dW, C[:4, :4]), r"C has shape \(4, 4\) but the layer has 12 input channels"),
        (lambda: svd_decompose(dW).residual_errors(20), "max_rank 20 is out of range"),
    ]
    for call, match in cases:
        with pytest.raises(LpcError, match=match):
            call()


def test_bad_espace_inputs_raise():
    dW, C = _good()
    cases = [
        (lambda: espace_projection("hessian", 2, C), "unknown ESPACE statistic 'hessian'.*act, weight, grad"),
        (lambda: espace_projection("weight", 2, C), "'weight' needs the weight W"),
        (lambda: espace_projection("weight", 2, C, W=dW[:, :5]), r"W has shape \(8, 5\)"),
        (lambda: espace_projection("grad", 2, C), "'grad' needs C_g"),
        (lambda: espace_projection("grad", 2, C, C_g=-torch.ones(12)), "not a finite non-negative"),
        (lambda: espace_projection("act", 13, C), "rank 13 is out of range"),
        (lambda: espace_residual(dW, torch.eye(10)), r"P has shape \(10, 10\) but dW has shape \(8, 12\)"),
    ]
    for call, match in cases:
        with pytest.raises(LpcError, match=match):
            call()


def test_bad_storage_and_allocation_inputs_raise():
    B, A = svd_lowrank(_good()[0], 2)
    cases = [
        (lambda: quantize_factors(B, A, "fp5"), "unknown format 'fp5'"),
        (lambda: quantize_factors(B, A[:1], None), "disagree on the rank"),
        (lambda: allocate_ranks({"a": [1.0]}, {"a": 1}, -1, 2), "budget_params must be an integer >= 0"),
        (lambda: allocate_ranks({"a": [1.0]}, {"a": 0}, 5, 2), r"params_per_rank\['a'\] must be"),
        (lambda: allocate_ranks({"a": [1.0]}, {"b": 1}, 5, 2), "no error curve for layer 'b'"),
        (lambda: allocate_ranks({"a": [1.0, float("nan")]}, {"a": 1}, 5, 2), "finite numbers"),
        (lambda: allocate_ranks({"a": [1.0]}, {"a": 1}, 5, {"b": 2}), "max_rank for layer 'a'"),
    ]
    for call, match in cases:
        with pytest.raises(LpcError, match=match):
            call()
