"""tools/bench_reference.py on a tiny stand-in checkout (the real jaychempan/PIR is not needed):
the same file layout and entry points, a small torch model behind them."""
import importlib.util
import os
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")

# Each file the tool imports or reads, with the names it uses. The model's constructor asks
# torch.load for its backbone weights, as the real one does, so the test also shows that no
# checkpoint is read.
FAKE_CHECKOUT = {
    "configs/Retrieval_rsitmd.yaml": """\
        vision_config: 'configs/config_swinT_224.json'
        text_config: 'configs/config_bert.json'
        resnet_ckpt: 'data/resnet.pth'
        image_res: 224
        embed_dim: 8
        center_factor: 1
        optimizer: {opt: adamW, lr: 6e-5, weight_decay: 0.01, lr_mult: 2}
        schedular: {sched: linear, lr: 6e-5, epochs: 2, num_warmup_steps: 0.1}
        """,
    "configs/config_swinT_224.json": '{"ckpt": "data/swin.pth", "image_res": 224}',
    "configs/config_bert.json": '{"vocab_size": 64, "hidden_size": 8}',
    "utils/__init__.py": """\
        import json


        def read_json(path):
            with open(path) as f:
                return json.load(f)


        class AttrDict(dict):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.__dict__ = self
        """,
    "models/__init__.py": "",
    "models/model_retrieval.py": """\
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        from utils import read_json


        class PIR(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                vision = read_json(config['vision_config'])
                assert vision['image_res'] == config['image_res']
                torch.load(vision['ckpt'])['model']
                torch.load(config['resnet_ckpt'])
                self.image = torch.nn.Conv2d(3, config['embed_dim'], 4, 4)
                self.text = torch.nn.Embedding(read_json(config['text_config'])['vocab_size'], config['embed_dim'])

            def forward(self, image, text_ids, idx=None, label=None):
                img = F.normalize(self.image(image).mean((2, 3)))
                txt = F.normalize(self.text(text_ids).mean(1))
                gathered = [torch.empty_like(img)]
                dist.all_gather(gathered, img)  # the real losses all-gather too
                logits = gathered[0] @ txt.t() / 0.07
                same = (label[:, None] == label[None, :]).float()
                return F.cross_entropy(logits, torch.arange(len(img))), (logits * same).mean()
        """,
    "optim.py": """\
        import torch


        def create_optimizer(args, model):
            return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        """,
    "scheduler.py": """\
        from torch.optim.lr_scheduler import LambdaLR


        def create_scheduler(args, optimizer):
            return LambdaLR(optimizer, lambda step: 1.0)
        """,
}


def _tool():
    spec = importlib.util.spec_from_file_location("bench_reference", os.path.join(TOOLS, "bench_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_checkout(root, files=FAKE_CHECKOUT):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_times_a_checkout_at_our_shapes_without_reading_checkpoints(tmp_path, monkeypatch):
    checkout = _write_checkout(tmp_path / "PIR")
    foreign_utils = type(sys)("utils")  # another package's `utils` must survive the run
    monkeypatch.setitem(sys.modules, "utils", foreign_utils)
    threads = torch.get_num_threads()
    try:
        result = _tool().time_original_pir(str(checkout), batch=4, text_len=6, image_size=32, repeats=2, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert result["s_per_step"] > 0 and result["images_per_s"] > 0
    assert (result["batch"], result["text_len"], result["image_size"], result["threads"]) == (4, 6, 32, 1)
    assert result["skipped_checkpoints"] == ["data/swin.pth", "data/resnet.pth"]
    assert sys.modules["utils"] is foreign_utils and str(checkout) not in sys.path
    assert not torch.distributed.is_initialized()


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no such directory .*nowhere"):
        _tool().time_original_pir(str(tmp_path / "nowhere"), 2, 4, 32, 1)


def test_a_directory_that_is_not_pir_names_the_file_it_expected(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(SystemExit, match=r"not look like a checkout of jaychempan/PIR .*models/model_retrieval.py"):
        _tool().time_original_pir(str(tmp_path / "other"), 2, 4, 32, 1)


def test_a_failing_import_names_the_missing_module(tmp_path):
    files = dict(FAKE_CHECKOUT)
    files["optim.py"] = "import timm_that_is_not_installed\n"
    checkout = _write_checkout(tmp_path / "PIR", files)
    with pytest.raises(SystemExit, match=r"PIR.*no module named 'timm_that_is_not_installed'"):
        _tool().time_original_pir(str(checkout), 2, 4, 32, 1)
