"""Test/CI environment workaround, NOT part of alignprop: make the PyPI torchvision wheel importable on CPU torch.

The torchvision wheel on PyPI is a CUDA build; on the CPU torch used by our test machines its compiled ``_C.so``
fails to load and ``import torchvision`` (and with it transformers, diffusers, peft, open_clip) raises
``operator torchvision::nms does not exist``. ``scripts/install.sh`` installs this module plus a ``.pth`` line that
arms a meta-path hook: the first time ``torchvision`` is imported, we try to load its ``_C.so``; if that fails we
declare the two operator schemas torchvision registers fake kernels for (``nms``, ``qnms``). Tensor/PIL transforms
then work; compiled ops (nms) stay unavailable. Python processes that never import torchvision pay nothing.
On a GPU machine with a matching torchvision this hook finds ``_C.so`` loadable and does nothing else.
"""
import importlib.abc
import importlib.util
import sys


def _declare_torchvision_ops() -> None:
    import glob
    import os

    import torch

    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionHook)]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for so in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(so)
            return
        except Exception:  # the CUDA build on CPU torch: fall through to declaring the schemas
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    _LIBS.append(lib)  # keep the fragment alive


_LIBS: list = []


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            _declare_torchvision_ops()
        return None


def install() -> None:
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
