"""The module map: imports run one way (no cycles, lazy imports included) and ``kernels`` is a leaf.

Also: private names stay in their package, private JAX only through the compat modules, parallel
state without kernels, and a light ``import spmd``.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("spmd", "kernels", "models")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges ``module -> imported module`` among the project's modules, every import statement counted."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_between_modules():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()) or [])


def test_no_import_cycle_between_packages():
    pkg_graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, deps in import_graph().items():
        for d in deps:
            a, b = m.split(".")[0], d.split(".")[0]
            if a != b:
                pkg_graph[a].add(b)
    assert _cycle(pkg_graph) is None, pkg_graph
    assert pkg_graph["kernels"] == set(), f"kernels must import only JAX, found {pkg_graph['kernels']}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _package_of(module: str, modules: dict[str, pathlib.Path]) -> str:
    """The package a module belongs to: itself for a package's ``__init__``, else its parent."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_home(target: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The package a dotted import target's private part belongs to (``None``: nothing private in it).

    A private module (``p._m``) belongs to its parent package; a private name (``m._x``) to its module's package.
    """
    parts = target.split(".")
    private = next((".".join(parts[: i + 1]) for i in range(1, len(parts)) if _is_private(parts[i])), None)
    if private is None:
        return None
    holder = private
    while holder and holder not in modules:
        holder = holder.rpartition(".")[0]
    if not holder:
        return None
    return holder.rpartition(".")[0] if holder == private else _package_of(holder, modules)


def private_imports() -> list[str]:
    """Every use of a private name (``_x``, or a module ``_m``) of a module in another package.

    Counted: ``from m import _x``, imports of a private module (``from p import _m``,
    ``import p._m``, ``from p._m import x``), and ``alias._x`` on an imported project module.
    Within one package (modules with the same parent) private names are shared freely.
    """
    modules = _modules()
    found = []
    for name, path in sorted(modules.items()):
        package = _package_of(name, modules)
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        uses: list[tuple[str, int, str]] = []  # (target, line, what)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        uses.append((a.name, node.lineno, f"import {a.name}"))
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    uses.append((full, node.lineno, f"from {node.module} import {a.name}"))
                    if full in modules:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
                mod = aliases.get(node.value.id)
                if mod is not None:
                    uses.append((f"{mod}.{node.attr}", node.lineno, f"{node.value.id}.{node.attr} ({mod})"))
        for target, line, what in uses:
            home = _private_home(target, modules)
            if home is not None and home != package:
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    return sorted(found)


def test_no_module_uses_a_private_name_of_another_package():
    assert private_imports() == [], "\n".join(private_imports())


def test_only_the_compat_modules_import_private_jax():
    """``jax._src`` is reached through ``spmd/compat.py`` (spmd, models) and ``kernels/compat.py`` only."""
    allowed = {"spmd.compat", "kernels.compat"}
    found = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(t == "jax._src" or t.startswith("jax._src.") for t in targets) and name not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], f"private JAX imported outside the compat modules: {found}"


def test_parallel_state_keeps_the_books_only():
    """Peer buffers are the communicators' business: parallel state imports no kernel package."""
    assert not {d for d in import_graph()["spmd.parallel_state"] if d.startswith("kernels")}


@pytest.mark.multiprocess
def test_import_spmd_loads_no_pipe_and_no_host_connections():
    """`import spmd` and the launcher load neither JAX nor a pipe; each public name loads its module on first use."""
    code = (
        "import sys, spmd, spmd.launch\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('jax', 'spmd.kv_transfer', 'spmd.host_net')))\n"
        "assert not heavy, heavy[:8]\n"
        "import spmd.parallel_state as ps, spmd.collectives as c\n"
        "assert spmd.shard_map is ps.shard_map and spmd.all_reduce is c.all_reduce\n"
        "assert spmd.TCPKVPipe.__module__ == 'spmd.kv_transfer.tcp' and 'spmd.kv_transfer' in sys.modules\n"
        "assert set(spmd.__all__) <= set(dir(spmd))\n"
        "try:\n    spmd.NoSuchName\nexcept AttributeError as e:\n    assert 'NoSuchName' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_private_name_finder_finds_them(tmp_path, monkeypatch):
    """The rule's edge cases, on a throwaway tree: across packages flagged, within one package allowed."""
    for rel, text in {
        "spmd/__init__.py": "",
        "spmd/a.py": "_X = 1\nY = 2\n",
        "spmd/_m.py": "Z = 3\n",
        "spmd/sub/__init__.py": "",
        "spmd/sub/b.py": "from spmd.a import _X\nfrom spmd._m import Z\nfrom spmd import a\na._X\na.Y\n",
        "spmd/c.py": "from spmd.a import _X\nfrom spmd import _m\n",
        "kernels/__init__.py": "",
        "models/__init__.py": "import spmd.a as aa\naa._X\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = private_imports()
    assert got == [
        "models/__init__.py:2: aa._X (spmd.a)",
        "spmd/sub/b.py:1: from spmd.a import _X",
        "spmd/sub/b.py:2: from spmd._m import Z",
        "spmd/sub/b.py:4: a._X (spmd.a)",
    ], got


MAX_LINES = 450


def long_files() -> list[str]:
    """Every non-test Python file of the project over :data:`MAX_LINES` lines, with its length."""
    out = []
    for path in sorted(_modules().values()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(ROOT)}: {n} lines")
    return out


def test_no_file_passes_450_lines():
    """The house stays light: a module that grows past the limit is split by what it holds."""
    assert long_files() == [], "\n".join(long_files())


def test_the_long_file_finder_finds_them(tmp_path, monkeypatch):
    (tmp_path / "spmd").mkdir()
    (tmp_path / "spmd" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "spmd" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_files() == [f"spmd/long.py: {MAX_LINES + 1} lines"]


def test_an_unmarked_test_cannot_start_a_process():
    """conftest's guard: a test that starts a process without ``@pytest.mark.multiprocess`` fails, naming the fix."""
    with pytest.raises(AssertionError, match=r"starts a process but is not marked: add @pytest.mark.multiprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    import multiprocessing

    with pytest.raises(AssertionError, match="not marked"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def package_imports_of_tests(root: pathlib.Path) -> list[str]:
    """Test modules that import ``tests.x``: that works under ``python -m pytest`` (the working directory
    on ``sys.path``) and fails to collect under a plain ``pytest``; the test directory is on the path either way."""
    out = []
    for path in sorted((root / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            out += [f"{path.relative_to(root)}:{node.lineno}" for n in names if n == "tests" or n.startswith("tests.")]
    return out


def test_tests_import_their_helpers_by_module_name():
    assert package_imports_of_tests(ROOT) == []


def test_the_tests_package_import_finder_finds_them(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("from kv_pipes import x\nfrom tests.test_b import y\nimport tests\n")
    assert package_imports_of_tests(tmp_path) == ["tests/test_a.py:2", "tests/test_a.py:3"]
