"""Environment workaround for CPU-only machines, not used by alignprop itself: make the PyPI torchvision importable.

The torchvision wheel on PyPI is a CUDA build; on CPU torch its compiled ``_C.so`` fails to load and
``import torchvision`` (and with it transformers, diffusers, peft, open_clip) raises ``operator torchvision::nms does
not exist``. ``python -m alignprop_core.torchvision_cpu_fix install`` copies this file into the interpreter's
site-packages (as ``_alignprop_torchvision_cpu_fix.py``) with a ``.pth`` line that arms a meta-path hook, but only
when ``import torchvision`` fails there. The first time ``torchvision`` is imported, the hook tries to load its
``_C.so``; if that fails it declares the two operator schemas torchvision registers fake kernels for (``nms``,
``qnms``). Tensor/PIL transforms then work; compiled ops (nms) stay unavailable. Processes that never import
torchvision pay nothing; with a matching torchvision (GPU machines) the hook loads ``_C.so`` and does nothing else.
``--check`` reports the state without changing anything. This file imports only the standard library at import time,
so it also runs as a script (``python alignprop_core/torchvision_cpu_fix.py install``) in a venv without alignprop.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rest is imported where used: the .pth line imports this module in every process
    from pathlib import Path

MODULE_NAME = "_alignprop_torchvision_cpu_fix"
PTH_LINE = f"import {MODULE_NAME}; {MODULE_NAME}.install()\n"
# run in a fresh interpreter: drop an armed hook (of any version of this file), then import torchvision
_IMPORT_WITHOUT_HOOK = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "
                        "'_TorchvisionHook']; import torchvision")


# ----------------------------------------------------------------------------------------------- the hook
def _declare_torchvision_ops() -> None:
    import glob

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
    """Arm the import hook in this process (what the ``.pth`` line calls)."""
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())


# ----------------------------------------------------------------------------------------------- install / check
def site_packages() -> Path:
    """The running interpreter's site-packages (purelib), where the hook goes."""
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["purelib"])


def hook_installed(site: Path) -> bool:
    """Both files of the hook are in ``site``."""
    pth = site / f"{MODULE_NAME}.pth"
    return (site / f"{MODULE_NAME}.py").is_file() and pth.is_file() and pth.read_text().strip() == PTH_LINE.strip()


def torchvision_present() -> bool:
    """torchvision is installed (looked up on sys.path directly, so an armed hook does not import torch here)."""
    return importlib.machinery.PathFinder.find_spec("torchvision") is not None


def torchvision_imports(with_hook: bool) -> bool:
    """Whether ``import torchvision`` succeeds in a fresh process of this interpreter, with the hook armed (when it
    is installed) or without it."""
    import subprocess

    code = "import torchvision" if with_hook else _IMPORT_WITHOUT_HOOK
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    return result.returncode == 0


def decide(present: bool, imports_without_hook: bool, installed: bool, imports_with_hook: bool = True
           ) -> tuple[str, bool]:
    """``(state, needed)`` for the facts found. States: ``no-torchvision``, ``not-needed``, ``installed`` (needed and
    working), ``missing`` (needed, not installed), ``broken`` (installed, yet torchvision still fails to import),
    ``unneeded-installed`` (installed where torchvision imports anyway)."""
    if not present or imports_without_hook:
        if installed:
            return "unneeded-installed", False
        return ("not-needed" if present else "no-torchvision"), False
    if not installed:
        return "missing", True
    return ("installed" if imports_with_hook else "broken"), True


def status(site: Path | None = None) -> tuple[str, bool]:
    """:func:`decide` for this interpreter (runs ``import torchvision`` in a subprocess, without and, when the hook is
    installed and needed, with the hook)."""
    site = site or site_packages()
    present = torchvision_present()
    imports = present and torchvision_imports(with_hook=False)
    installed = hook_installed(site)
    works = installed and present and not imports and torchvision_imports(with_hook=True)
    return decide(present, imports, installed, works)


def write_hook(site: Path) -> None:
    """Copy this module into ``site`` and add the ``.pth`` line that arms it at interpreter start."""
    from pathlib import Path

    source = Path(__file__).read_text(encoding="utf-8")
    for name, text in ((f"{MODULE_NAME}.py", source), (f"{MODULE_NAME}.pth", PTH_LINE)):
        tmp = site / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, site / name)


def remove_hook(site: Path) -> None:
    for name in (f"{MODULE_NAME}.pth", f"{MODULE_NAME}.py"):
        (site / name).unlink(missing_ok=True)


MESSAGES = {
    "no-torchvision": "torchvision is not installed: no CPU import hook needed",
    "not-needed": "torchvision imports fine: no CPU import hook needed",
    "installed": "the CPU torchvision import hook is installed and needed (torchvision fails to import without it)",
    "missing": "torchvision fails to import and the CPU import hook is not installed; run: "
               "python -m alignprop_core.torchvision_cpu_fix install",
    "broken": "the CPU torchvision import hook is installed but torchvision still fails to import; reinstall "
              "torchvision to match torch",
    "unneeded-installed": "the CPU torchvision import hook is installed but not needed (it does nothing here)",
}


def main(argv: list[str] | None = None) -> int:
    """The command line: ``install`` or ``check``/``--check``; exit status 1 when the hook is needed but missing or
    broken."""
    import argparse

    description = "Install (only where needed) or check the CPU torchvision import hook."
    parser = argparse.ArgumentParser(prog="python -m alignprop_core.torchvision_cpu_fix", description=description)
    parser.add_argument("action", nargs="?", choices=["install", "check"], default="check",
                        help="install: add the hook to this interpreter where torchvision fails to import; "
                             "check (default): report only")
    parser.add_argument("--check", action="store_true", help="report only, change nothing (same as 'check')")
    args = parser.parse_args(argv)
    site = site_packages()
    state, _ = status(site)
    if args.check or args.action == "check":
        print(f"{MESSAGES[state]} ({sys.executable}, {site})")
        return 1 if state in ("missing", "broken") else 0
    if state == "installed":
        write_hook(site)  # refresh the copy (this file may be newer)
        print(f"{MESSAGES[state]}; refreshed it in {site}")
        return 0
    if state != "missing":
        print(MESSAGES[state])
        return 1 if state == "broken" else 0
    write_hook(site)
    if not torchvision_imports(with_hook=True):
        remove_hook(site)
        print(f"error: torchvision still fails to import with the CPU import hook; reinstall torchvision to match "
              f"torch ({sys.executable})", file=sys.stderr)
        return 2
    print(f"installed the CPU torchvision import hook into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
