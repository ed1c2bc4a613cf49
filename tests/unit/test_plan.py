"""tools/plan.py over several meshes in one call: per-device memory falls as fsdp grows."""
import importlib.util
import pathlib

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


def _plan():
    spec = importlib.util.spec_from_file_location("tools_plan", TOOLS / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIR_TINY = ["--config", "configs/pir.py:demo", "--config.model.preset=pir_test", "--config.data.image_size=32",
            "--config.batch_size=8", "--config.reference_device_batch=8"]
BITA_TINY = ["--config", "configs/bita.py:stage=2,demo", "--config.batch_size=8", "--config.reference_device_batch=8"]


@pytest.mark.parametrize("argv", [PIR_TINY, BITA_TINY], ids=["pir", "bita_stage2"])
def test_memory_per_device_falls_as_fsdp_grows(argv, capsys):
    plan = _plan()
    results = plan.main(argv + ["--mesh", "fsdp=1", "--mesh", "fsdp=2", "--mesh", "fsdp=4", "--fit"])
    out = capsys.readouterr().out
    assert [r["mesh"]["fsdp"] for r in results] == [1, 2, 4] and all(r["batch"] == 8 for r in results)
    # parameters, optimiser state and the batch are split over fsdp ...
    args = [r["argument"] for r in results]
    assert args[0] > args[1] > args[2], args
    # ... and so is the whole step's footprint at a fixed global batch
    totals = [r["total"] for r in results]
    assert totals[0] > totals[2], totals
    assert "summary" in out and "GPU 80 GB" in out and out.count("| fsdp=") >= 4


def test_mesh_names_and_the_fit_rule():
    plan = _plan()
    assert plan.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan.mesh_name({"data": 2, "fsdp": 4, "tensor": 1}) == "data=2,fsdp=4"
    row = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "total": 20 * plan.GiB}
    assert not plan.fits(row, 16) and plan.fits(row, 24) and not plan.fits(row, 22)
