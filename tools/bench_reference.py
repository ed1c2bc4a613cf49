"""Time the original PIR code (github jaychempan/PIR) from the user's own checkout.

`python tools/bench.py pir --reference CHECKOUT` calls `time_original_pir`. The checkout is put
on sys.path only while its model is built; nothing of it is copied into this project.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (tools/timing.py)

# What a checkout of jaychempan/PIR must hold for this tool: the files it imports or reads.
EXPECTED_FILES = ("models/model_retrieval.py", "optim.py", "scheduler.py", "utils/__init__.py",
                  "configs/Retrieval_rsitmd.yaml")
# The checkout's top-level packages; generic names, so they are swapped out of sys.modules
# around the import and put back afterwards.
CHECKOUT_MODULES = ("models", "utils", "dataset", "optim", "scheduler")
RSITMD_TRAIN_CAPTIONS = 17175  # the schedule's steps per epoch, as tools/bench.py counts them


def check_checkout(checkout: str) -> str:
    """The checkout's absolute path, or SystemExit saying what is wrong with it."""
    path = os.path.abspath(os.path.expanduser(checkout))
    if not os.path.isdir(path):
        raise SystemExit(f"--reference {checkout}: no such directory ({path})")
    for rel in EXPECTED_FILES:
        if not os.path.isfile(os.path.join(path, rel)):
            raise SystemExit(f"--reference {checkout}: does not look like a checkout of jaychempan/PIR "
                             f"(expected {os.path.join(path, rel)})")
    return path


def _read_yaml(path: str) -> dict:
    """The reference reads its YAML with ruamel (YAML 1.2, so `6e-5` is a float); PyYAML would
    keep such numbers as strings, so they are converted here."""
    try:
        from ruamel.yaml import YAML

        with open(path) as f:
            return dict(YAML(typ="safe").load(f))
    except ImportError:
        import yaml

    def numbers(value):
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items()}
        if isinstance(value, list):
            return [numbers(v) for v in value]
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    with open(path) as f:
        return numbers(yaml.safe_load(f))


class _NoWeights(dict):
    """An empty state dict whose every key (e.g. ['model']) is again an empty state dict."""

    def __getitem__(self, key):
        return _NoWeights()


def _no_download(*args, **kwargs):
    raise RuntimeError("the original PIR code tried to download weights; this bench never does")


@contextlib.contextmanager
def _checkout_on_path(path: str):
    """The checkout's packages importable by their own names, and only for the duration."""
    saved = {name: mod for name, mod in sys.modules.items()
             if name.split(".")[0] in CHECKOUT_MODULES}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        yield
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if n.split(".")[0] in CHECKOUT_MODULES]:
            del sys.modules[name]
        sys.modules.update(saved)


@contextlib.contextmanager
def _random_init_only():
    """No checkpoint is read and no download can start while the model is built: torch.load
    answers every path with an empty state dict, so the constructor's load_state_dict(strict=False)
    calls keep the random init. Yields the paths it was asked for."""
    import torch
    import torch.hub
    import torch.utils.model_zoo

    asked = []

    def empty_state_dict(path, *args, **kwargs):
        asked.append(str(path))
        return _NoWeights()

    saved = torch.load, torch.hub.load_state_dict_from_url, torch.utils.model_zoo.load_url
    torch.load = empty_state_dict
    torch.hub.load_state_dict_from_url = torch.utils.model_zoo.load_url = _no_download
    try:
        yield asked
    finally:
        torch.load, torch.hub.load_state_dict_from_url, torch.utils.model_zoo.load_url = saved


@contextlib.contextmanager
def _transformers_adamw():
    """The reference's optim.py imports `transformers.optimization.AdamW`, which recent
    transformers removed; torch.optim.AdamW (the same decoupled-weight-decay Adam, same
    arguments) stands in while it is imported. Yields a note when it did."""
    import torch

    notes = []
    try:
        import transformers.optimization as hf_optim
    except ImportError:
        yield notes
        return
    if hasattr(hf_optim, "AdamW"):
        yield notes
        return
    hf_optim.AdamW = torch.optim.AdamW
    notes.append("optimiser: torch.optim.AdamW in place of transformers' AdamW (gone from transformers "
                 f"{getattr(sys.modules.get('transformers'), '__version__', '?')})")
    try:
        yield notes
    finally:
        del hf_optim.AdamW


def _import_failure(checkout: str, err: Exception) -> SystemExit:
    missing = getattr(err, "name", None) if isinstance(err, ImportError) else None
    first_line = (str(err).splitlines() or [""])[0]
    if missing:
        package = missing.split(".")[0]
        hint = f"pip install {package}" + (" built for your torch" if package == "torchvision" else "")
        return SystemExit(f"--reference {checkout}: importing the original PIR code failed: no module "
                          f"named '{missing}', which it needs ({hint})")
    if "torchvision::" in first_line:  # torchvision's compiled ops were built for another torch
        first_line += " (the installed torchvision does not match this torch)"
    return SystemExit(f"--reference {checkout}: importing the original PIR code failed: "
                      f"{type(err).__name__}: {first_line}")


def _paper_config(path: str, image_size: int, workdir: str) -> dict:
    """configs/Retrieval_rsitmd.yaml as Retrieval.py reads it, with the JSON paths made absolute
    (the reference opens them relative to its working directory) and `image_res` set to ours."""
    config = _read_yaml(os.path.join(path, "configs", "Retrieval_rsitmd.yaml"))
    for key in ("vision_config", "text_config"):
        config[key] = os.path.join(path, config[key])
    if image_size != config["image_res"]:  # the Swin JSON must agree (the reference asserts it)
        with open(config["vision_config"]) as f:
            vision = json.load(f)
        vision["image_res"] = image_size
        config["vision_config"] = os.path.join(workdir, "vision_config.json")
        with open(config["vision_config"], "w") as f:
            json.dump(vision, f)
        config["image_res"] = image_size
    return config


@contextlib.contextmanager
def _single_process_group(workdir: str):
    """The reference's losses all-gather through torch.distributed; a world of one (gloo, file
    store, no network) makes that the same identity a 1-GPU run of it computes."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'pg')}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def time_original_pir(checkout: str, batch: int, text_len: int, image_size: int, repeats: int,
                      threads: int | None = None) -> dict:
    """Seconds per training step of the original PIR code, at our bench's shapes.

    The model is the checkout's `models.model_retrieval.PIR` built from its own
    configs/Retrieval_rsitmd.yaml (the paper's RSITMD setting: Swin-T + BERT-base + the frozen
    ResNet-50 prior, VIR, LCA, contrastive + affiliation losses), exactly as Retrieval.py builds
    it. Its constructor reads Swin/BERT/ResNet checkpoints with torch.load; while it runs,
    torch.load returns empty state dicts (its loads are strict=False, so the modules keep their
    random init and every other line of the constructor, e.g. freezing the ResNet, still runs)
    and torch's download functions raise. The optimiser and schedule are the checkout's
    `optim.create_optimizer` / `scheduler.create_scheduler` with the YAML's settings.

    One step = forward + loss (loss_contr + center_factor * loss_affil, as Retrieval.train) +
    backward + optimizer.step() + scheduler.step(), float32, in train mode, on random images
    (batch x 3 x image_size x image_size) and `text_len` random BERT ids; the median of
    `repeats` steps after one warm-up. torch's thread count is set to `threads` (default: all
    cores) and left so, for a matmul peak measured afterwards at the same count.
    """
    path = check_checkout(checkout)
    import torch

    torch.set_num_threads(threads or os.cpu_count())
    with tempfile.TemporaryDirectory() as workdir, _checkout_on_path(path):
        config = _paper_config(path, image_size, workdir)
        with _transformers_adamw() as notes, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from models.model_retrieval import PIR
                from optim import create_optimizer
                from scheduler import create_scheduler
                from utils import AttrDict
            except Exception as err:  # a missing dependency, or one built for another torch
                raise _import_failure(checkout, err) from err
        torch.manual_seed(0)
        with _random_init_only() as skipped_checkpoints, contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PIR(config=config).float().train()
            optimizer = create_optimizer(AttrDict(config["optimizer"]), model)
            schedule = AttrDict(config["schedular"])
            schedule["step_per_epoch"] = math.ceil(RSITMD_TRAIN_CAPTIONS / batch)
            scheduler = create_scheduler(schedule, optimizer)

        with open(config["text_config"]) as f:
            vocab = json.load(f)["vocab_size"]
        images = torch.randn(batch, 3, image_size, image_size)
        text_ids = torch.randint(min(1000, vocab // 2), min(30000, vocab), (batch, text_len))
        idx = torch.arange(batch) // 2  # two captions per image, as in tools/bench.py
        label = torch.randint(0, 4, (batch,))

        def train_step():
            losses = model(images, text_ids, idx=idx, label=label)
            if isinstance(losses, tuple):  # (contrastive, affiliation)
                loss = losses[0] + config.get("center_factor", 1) * losses[1]
            else:
                loss = losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

        with _single_process_group(workdir), contextlib.redirect_stdout(io.StringIO()):
            seconds = timing.seconds(train_step, repeats)
    return {"s_per_step": seconds, "images_per_s": batch / seconds, "batch": batch, "text_len": text_len,
            "image_size": image_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "skipped_checkpoints": skipped_checkpoints, "notes": notes}
