import copy

import pytest
import torch

from netmend.edit import Edit, saved_values
from netmend.errors import NetmendError
from netmend.zoo.models import create_model


def _model():
    torch.manual_seed(0)
    return create_model("small-cnn", (1, 8, 8), 10)


def test_apply_then_revert_restores_every_parameter_bit_for_bit():
    m = _model()
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    edit = Edit({"fc1.weight": torch.randn_like(m.fc1.weight) * 1e-3, "conv1.bias": torch.randn_like(m.conv1.bias)})
    edit.apply(m)
    assert not torch.equal(m.fc1.weight, orig["fc1.weight"])
    edit.revert(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, orig[k]), k


def test_applied_reverts_on_leaving_the_block_even_after_an_exception():
    m = _model()
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    edit = Edit({"fc1.weight": torch.randn_like(m.fc1.weight) * 1e-3})
    with edit.applied(m) as inside:
        assert inside is m and not torch.equal(m.fc1.weight, orig["fc1.weight"])
    assert all(torch.equal(v, orig[k]) for k, v in m.state_dict().items())
    with pytest.raises(ZeroDivisionError):
        with edit.applied(m):
            1 / 0
    assert all(torch.equal(v, orig[k]) for k, v in m.state_dict().items())
    assert not saved_values(m, edit)                         # nothing held back after the block


def test_one_edit_applied_to_two_models_reverts_each_exactly():
    """The exact values an apply saves are kept per (model, edit), outside the Edit value."""
    a, b = _model(), _model()
    with torch.no_grad():
        b.fc1.weight.mul_(3)
    wa, wb = a.fc1.weight.clone(), b.fc1.weight.clone()
    edit = Edit({"fc1.weight": torch.randn_like(a.fc1.weight) * 0.1})
    edit.apply(a)
    edit.apply(b)
    assert set(saved_values(a, edit)) == set(saved_values(b, edit)) == {"fc1.weight"}
    edit.revert(b)
    edit.revert(a)
    assert torch.equal(a.fc1.weight, wa) and torch.equal(b.fc1.weight, wb)
    assert Edit(dict(edit.deltas)) != edit and edit == edit        # a value compared by identity


def test_a_half_applied_edit_is_rolled_back():
    """A delta that cannot be added (here: a tensor whose conversion fails) leaves no earlier delta in place."""
    m = _model()
    orig = {k: v.clone() for k, v in m.state_dict().items()}

    class Broken(torch.Tensor):
        def to(self, *a, **k):
            raise RuntimeError("out of memory")

    bad = torch.zeros_like(m.conv1.bias).as_subclass(Broken)
    edit = Edit({"fc1.weight": torch.ones_like(m.fc1.weight), "conv1.bias": bad})
    with pytest.raises(RuntimeError, match="out of memory"):
        edit.apply(m)
    assert all(torch.equal(v, orig[k]) for k, v in m.state_dict().items())
    assert not saved_values(m, edit)


def test_between_then_apply_reproduces_the_target():
    a = _model()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc2.weight.mul_(1.5)
    e = Edit.between(a, b)
    assert e.parameters == ["fc2.weight"]
    e.apply(a)
    assert torch.allclose(a.fc2.weight, b.fc2.weight)


def test_save_load_round_trip(tmp_path):
    e = Edit({"fc2.weight": torch.randn(10, 128)}, {"method": "x", "lambda": [1.0, 2.0]})
    e.save(tmp_path / "edit.safetensors")
    f = Edit.load(tmp_path / "edit.safetensors")
    assert torch.equal(f.deltas["fc2.weight"], e.deltas["fc2.weight"]) and f.meta == e.meta


def test_bad_edits_are_refused(tmp_path):
    m = _model()
    with pytest.raises(NetmendError, match="does not have"):
        Edit({"nope.weight": torch.zeros(1)}).apply(m)
    with pytest.raises(NetmendError, match="shape"):
        Edit({"fc2.weight": torch.zeros(3)}).apply(m)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NetmendError, match="cannot read"):
        Edit.load(tmp_path / "bad.safetensors")


def test_written_files_and_run_folders_get_the_usual_permissions(tmp_path):
    """Atomic writes go through private temporaries (0600 / 0700); what the user gets must not stay private."""
    import os

    from netmend.edit import atomic_write
    from netmend.modelio import fresh_folder

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
        with fresh_folder(tmp_path / "run") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755


def test_a_run_killed_outright_leaves_nothing_the_next_run_keeps(tmp_path):
    """SIGKILL cannot be caught: the hidden sibling a run folder was being built in stays. The next run for the
    same --out removes it (its process is gone) and leaves a sibling whose process still runs."""
    import os
    import subprocess
    import sys

    from netmend.modelio import fresh_folder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".run.partial-{int(gone.stdout)}-abcdefgh"
    live = tmp_path / f".run.partial-{os.getpid()}-ijklmnop"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    with fresh_folder(tmp_path / "run") as d:
        (d / "x.txt").write_text("x")
    assert not dead.exists() and live.exists() and (tmp_path / "run" / "x.txt").exists()


def test_the_report_reads_the_same_norms_as_the_edit(tmp_path):
    """The report's table of changed weights is `Edit.norms` of the saved edit against the saved model, except that
    a weight whose norm is zero gets no relative norm (rather than an infinite one)."""
    from safetensors.torch import save_file

    from netmend.report.html import _norms_from_file

    m = _model()
    with torch.no_grad():
        m.conv1.bias.zero_()
    edit = Edit({"fc1.weight": torch.randn_like(m.fc1.weight) * 1e-2, "conv1.bias": torch.ones_like(m.conv1.bias)})
    edit.save(tmp_path / "edit.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    read = _norms_from_file(tmp_path / "edit.safetensors", tmp_path / "model.safetensors")
    direct = edit.norms(m)
    assert read["fc1.weight"] == direct["fc1.weight"] and "relative" in read["fc1.weight"]
    assert direct["conv1.bias"]["relative"] == float("inf") and "relative" not in read["conv1.bias"]
    assert read["conv1.bias"]["fro"] == direct["conv1.bias"]["fro"]
