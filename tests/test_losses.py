"""SimCLR's NT-Xent against values worked out by hand, and its invariances."""

from __future__ import annotations

import math

import pytest
import torch

from medmim.models.losses import nt_xent


def _u(deg: float) -> list[float]:
    """The 2-D unit vector at ``deg`` degrees."""
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_identical_views_of_two_orthogonal_images() -> None:
    """z1 = z2 = [e1, e2], temperature 0.5, so logits are cosines x 2.

    The 4 projections are [e1, e2, e1, e2]; row 0 (e1) picks among rows 1, 2, 3 with cosines 0, 1, 0
    -> logits 0, 2, 0; its partner is row 2 (logit 2): loss -log(e^2 / (e^2 + 1 + 1)) = log(1 + 2 e^-2).
    Every row is the same up to relabelling, so the mean is log(1 + 2 e^-2) = 0.2395448.
    """
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = math.log(1 + 2 * math.exp(-2))
    assert expected == pytest.approx(0.2395448, abs=1e-7)
    assert float(nt_xent(z, z.clone(), temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_partners_orthogonal_and_the_other_image_aligned() -> None:
    """z1 = [e1, e2], z2 = [e2, e1] (each view's partner is orthogonal to it, the other image's view equal).

    Row 0 (e1) against rows 1, 2, 3 = e2, e2, e1: cosines 0, 0, 1 -> logits 0, 0, 2; the partner is row 2
    (logit 0): loss -log(1 / (1 + 1 + e^2)) = log(2 + e^2) = 2 + log(1 + 2 e^-2) = 2.2395448, for every row.
    """
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected = math.log(2 + math.exp(2))
    assert expected == pytest.approx(2.2395448, abs=1e-7)
    assert float(nt_xent(z1, z2, temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_views_at_sixty_degrees() -> None:
    """z1 = [u(0), u(90)], z2 = [u(60), u(150)] (u(d): unit vector at d degrees), temperature 0.5.

    Rows a, b, c, d = u(0), u(90), u(60), u(150); partners a-c, b-d. Cosines:
        a.b = 0, a.c = cos 60 = 1/2, a.d = cos 150 = -sqrt(3)/2, b.c = cos 30 = sqrt(3)/2, b.d = 1/2, c.d = 0.
    Logits (x 2), the partner's first, loss = -partner + log(sum of the three):
        a: c 1, b 0, d -sqrt(3)   -> -1 + log(e + 1 + e^-sqrt(3))
        b: d 1, a 0, c sqrt(3)    -> -1 + log(e + 1 + e^sqrt(3))
        c: a 1, b sqrt(3), d 0    -> -1 + log(e + e^sqrt(3) + 1)
        d: b 1, a -sqrt(3), c 0   -> -1 + log(e + e^-sqrt(3) + 1)
    Mean: -1 + (log(1 + e + e^-sqrt(3)) + log(1 + e + e^sqrt(3))) / 2 = 0.7986570.
    """
    z1 = torch.tensor([_u(0), _u(90)])
    z2 = torch.tensor([_u(60), _u(150)])
    r3 = math.sqrt(3)
    expected = -1 + (math.log(1 + math.e + math.exp(-r3)) + math.log(1 + math.e + math.exp(r3))) / 2
    assert expected == pytest.approx(0.7986570, abs=1e-7)
    assert float(nt_xent(z1, z2, temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_temperature_divides_the_cosines() -> None:
    """The identical-views case at temperature 1: logits 0, 1, 0 -> log(1 + 2/e) = 0.5514447."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(nt_xent(z, z, temperature=1.0)) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_invariances() -> None:
    """The loss is the same when the two views swap roles, pairs are reordered, projections are rescaled
    (they are normalised) or rotated together (only cosines count)."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    ref = nt_xent(z1, z2, temperature=0.2)
    perm = torch.randperm(6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))  # an orthogonal matrix
    scale = torch.rand(6, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(nt_xent(z2, z1, temperature=0.2), ref)
    torch.testing.assert_close(nt_xent(z1[perm], z2[perm], temperature=0.2), ref)
    torch.testing.assert_close(nt_xent(z1 * scale, z2 * scale.flip(0), temperature=0.2), ref)
    torch.testing.assert_close(nt_xent(z1 @ q, z2 @ q, temperature=0.2), ref, rtol=1e-5, atol=1e-5)


def test_lower_when_partners_agree() -> None:
    """Aligned pairs score lower than the same projections with the partners shuffled."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 16, generator=g)
    aligned = nt_xent(z1, z1 + 0.01 * torch.randn(8, 16, generator=g))
    shuffled = nt_xent(z1, z1.roll(1, dims=0))
    assert float(aligned) < float(shuffled)
