"""tools/plan.py and tools/bench.py run on tiny configs (numbers, never timings, are checked)."""
import importlib.util
import pathlib

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MEMORY_KEYS = ("argument", "output", "temp", "total")


def _check_plan(result, out):
    for key in MEMORY_KEYS:
        assert result[key] > 0, (key, result)
    assert result["trainable_params"] > 0 and result["frozen_params"] > 0
    assert "memory per device" in out and "total (arg + out - alias + temp)" in out


def test_plan_bita_stage2_demo(capsys):
    plan = _tool("plan")
    result = plan.main(["--config", "configs/bita.py:stage=2,demo", "--config.batch_size=4", "--devices", "1"])
    _check_plan(result, capsys.readouterr().out)
    assert result["devices"] == 1
    # the demo trains its tiny OPT; the frozen part is the ViT
    assert result["trainable_bytes"] == 4 * result["trainable_params"]


def test_plan_pir_test(capsys):
    plan = _tool("plan")
    result = plan.main(["--config", "configs/pir.py:demo", "--config.model.preset=pir_test",
                        "--config.data.image_size=32", "--config.batch_size=4",
                        "--config.reference_device_batch=4", "--devices", "1", "--mesh", "data=1,fsdp=1,tensor=1"])
    _check_plan(result, capsys.readouterr().out)
    assert result["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_parse_mesh():
    plan = _tool("plan")
    assert plan.parse_mesh("data=1,fsdp=8,tensor=1") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan.parse_mesh(None) is None
    with pytest.raises(SystemExit):
        plan.parse_mesh("data")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["pir", "bita"])
def test_bench_quick_prints_a_row(what, capsys):
    bench = _tool("bench")
    bench.main([what, "--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "MFU" in out and "matmul peak" in out
    assert ("PIR pir_test" if what == "pir" else "ours (trainer step, jitted)") in out


@pytest.mark.slow
def test_bench_chunks_gives_the_same_loss_in_less_memory(capsys):
    rows = _tool("bench").bench_chunks(repeats=1, batch=32, quick=True, block=8)
    assert [r["step"] for r in rows] == ["full batch", "GradCache, chunks of 8", "GradCache, chunks of 16"]
    assert len({r["loss"] for r in rows}) == 1  # the same training step, whatever the chunking
    temps = [float(r["temp MiB"]) for r in rows]
    assert temps[1] < temps[0]
