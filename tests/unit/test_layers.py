"""The packages of server/ import downward only (README: layout): a module may import its own package and the
packages on floors below it, never a package on its own floor or above. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server"
# The floors, lowest first: what each package may import is every package on a lower floor.
FLOORS: list[tuple[str, ...]] = [
    ("base",),
    ("runtimes",),
    ("registry", "batching"),
    ("dataplane",),
    ("protocols",),
    ("grpc", "http"),
    ("settings",),
    ("app",),
    ("workers",),
    ("__main__",),
]
FLOOR = {package: index for index, packages in enumerate(FLOORS) for package in packages}


def package_of(module: str) -> str:
    """'server.registry.manager' -> 'registry'; 'server.app' -> 'app'."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """Every server module the file imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "server":
                found += [(node.lineno, f"server.{alias.name}") for alias in node.names]
            elif node.module.startswith("server."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("server.")]
    return found


def test_every_package_has_a_floor() -> None:
    modules = {p.name for p in SERVER.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules |= {p.stem for p in SERVER.glob("*.py") if p.name != "__init__.py"}
    assert modules == set(FLOOR), f"give every package of server/ a floor: {sorted(modules ^ set(FLOOR))}"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(SERVER.rglob("*.py")):
        module = ".".join(path.relative_to(SERVER.parent).with_suffix("").parts)
        if module == "server.__init__":
            continue
        own = package_of(module)
        for line, imported in imports(path):
            other = package_of(imported)
            if other != own and FLOOR[other] >= FLOOR[own]:
                upward.append(f"{path.relative_to(SERVER.parent)}:{line} ({own}) imports {imported} ({other})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def top_level_imports(path: Path) -> list[str]:
    """Every module the file imports (absolute imports), lazy ones too."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_transport_below_the_transports() -> None:
    """Protocols, the data plane, the registry, runtimes and batching know nothing of gRPC."""
    offenders = []
    for package in ("base", "runtimes", "registry", "batching", "dataplane", "protocols"):
        for path in sorted((SERVER / package).rglob("*.py")):
            names = top_level_imports(path)
            offenders += [f"{path.relative_to(SERVER.parent)}: {n}" for n in names if n.split(".")[0] == "grpc"]
    assert not offenders, "gRPC imported below the transport:\n" + "\n".join(offenders)


def test_each_transport_keeps_to_its_own_stack() -> None:
    """The HTTP transport imports no gRPC, and nothing but the HTTP transport imports its HTTP stack."""
    offenders = []
    for path in sorted(SERVER.rglob("*.py")):
        package = package_of(".".join(path.relative_to(SERVER.parent).with_suffix("").parts))
        for name in top_level_imports(path):
            top = name.split(".")[0]
            if (package == "http" and top == "grpc") or (package != "http" and top in ("uvicorn", "httptools")):
                offenders.append(f"{path.relative_to(SERVER.parent)}: {name}")
    assert not offenders, "a transport's stack imported outside it:\n" + "\n".join(offenders)
