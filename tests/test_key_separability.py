"""benchmarks/key_separability.py: the single-edit ridge direction and what it reads on other keys."""

from pathlib import Path

import torch


def _measures(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from key_separability import measures

    return measures


def test_an_edit_moves_its_own_key_by_one_and_a_key_it_does_not_share_by_nothing(monkeypatch):
    measures = _measures(monkeypatch)
    c0 = torch.eye(4, dtype=torch.float64)
    edits = [torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])]
    nq = [torch.tensor([[0.0, 0.0, 3.0, 0.0]])]  # a direction no edit key has
    out = measures(c0, edits, [edits[0].clone()], nq, [edits[0].clone()], rho=0.5, first=False)
    assert abs(out["transfer"] - 1.0) < 1e-9 and out["nq"] < 1e-9
    # each edit key moves itself by 1 and the other by 0: RMS over the 2 x 2 pairs is sqrt(1/2)
    assert abs(out["relation"] - 0.5 ** 0.5) < 1e-9
    first = measures(c0, edits, [edits[0].clone()], nq, [edits[0].clone()], rho=0.5, first=True)
    assert abs(first["relation"] - 1.0) < 1e-9  # the first row of each prompt only


def test_a_strong_c0_steers_the_edit_away_from_the_directions_it_covers(monkeypatch):
    measures = _measures(monkeypatch)
    edit = [torch.tensor([[1.0, 1.0, 0.0]])]
    nq = [torch.tensor([[1.0, 0.0, 0.0]])]  # the edit shares its first coordinate with the NQ key
    covered = torch.diag(torch.tensor([100.0, 1e-3, 1e-3], dtype=torch.float64))  # C_0 covers the NQ direction
    plain = torch.eye(3, dtype=torch.float64)
    spill_covered = measures(covered, edit, [edit[0]], nq, nq, rho=1e-3, first=False)["nq"]
    spill_plain = measures(plain, edit, [edit[0]], nq, nq, rho=1e-3, first=False)["nq"]
    assert spill_covered < 0.01 and spill_plain > 0.4


def test_penalising_how_paraphrases_move_the_key_carries_the_edit_to_the_paraphrase(monkeypatch):
    """A = C_0 + w·C_inv with C_inv along the paraphrase's shift: the edit stops reading that direction, so the
    paraphrase's key moves by as much as the edit's own (transfer 1), where without it the shift costs transfer."""
    measures = _measures(monkeypatch)
    c0 = torch.diag(torch.tensor([0.1, 0.1, 1.0], dtype=torch.float64))
    edit = [torch.tensor([[1.0, 1.0, 0.0]])]
    paraphrase = [torch.tensor([[1.0, 0.2, 0.0]])]  # the paraphrase moves the key along the second coordinate
    shift = (paraphrase[0] - edit[0]).double()
    c_inv = shift.T @ shift
    nq = [torch.tensor([[0.0, 0.0, 1.0]])]
    plain = measures(c0, edit, paraphrase, nq, nq, rho=1e-3, first=False)["transfer"]
    invariant = measures(c0 + 100.0 * c_inv, edit, paraphrase, nq, nq, rho=1e-3, first=False)["transfer"]
    assert plain < 0.7 and abs(invariant - 1.0) < 0.01
