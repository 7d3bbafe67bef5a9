"""The shape of the code: no import cycles in alignprop_core (function-level imports included), no oversized module,
family-specific code only in families/, plugins importing only the declared plugin API."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignprop_core"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """Every alignprop_core module ``path`` imports, at any depth (module level, functions, methods)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("alignprop_core"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignprop_core"):
            found.add(node.module)
            # `from alignprop_core import plugins` imports the submodule alignprop_core.plugins
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE / node.module.replace("alignprop_core", "").strip(".") / f"{alias.name}.py")
                         .is_file() or (PACKAGE / f"{alias.name}.py").is_file() and node.module == "alignprop_core")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in internal_imports(path):
            while target not in modules and "." in target:  # `from alignprop_core.x import name`
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and target != "alignprop_core":
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_seen():
    tree = PACKAGE / "cli.py"
    assert "alignprop_core.trainer" in internal_imports(tree)  # cli imports the trainer inside cmd_train


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_oversized(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}: split the concept)"


def test_the_cli_help_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from alignprop_core.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


#: Code that names a family: the family's name as a string or identifier, its pipeline classes, its parts. Prose
#: ("SD 1.x and SDXL" in a message) is not matched.
FAMILY_WORDS = re.compile(r"""["']sdx?l?["']|\bsdxl\s*=|\bsdxl_|_sdxl\b|StableDiffusion(XL)?Pipeline|text_encoder_2|"""
                          r"add_time_ids")
#: Outside families/ these may name a family: tiny.py and __init__.py re-export the tiny builders by their public
#: names, cli.py keeps the --sdxl alias, config.py's help names the tiny model ids, trl_compat.py is TRL's API
#: (DefaultDDPOStableDiffusionPipeline is TRL's class name).
FAMILY_NAMES_ALLOWED_IN = {"tiny.py", "__init__.py", "cli.py", "config.py", "trl_compat.py"}


def test_family_specific_code_lives_in_families():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "families" in path.relative_to(PACKAGE).parts or path.name in FAMILY_NAMES_ALLOWED_IN:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_WORDS.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "family-specific code outside alignprop_core/families/:\n" + "\n".join(offenders)


def test_the_family_check_sees_family_code(tmp_path):
    assert FAMILY_WORDS.search('if family == "sdxl":') and FAMILY_WORDS.search("pipe.text_encoder_2")
    assert FAMILY_WORDS.search("decode(latents, sdxl=True)") and FAMILY_WORDS.search("StableDiffusionXLPipeline")
    assert not FAMILY_WORDS.search("denoiser = family.denoiser(pipe)")
    assert not FAMILY_WORDS.search('"LoRAs of different base models, e.g. SD 1.x and SDXL"')
