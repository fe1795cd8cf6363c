"""The README's "Map of the tree" agrees with the code: every path it names exists, and
every import inside the package goes the way its import line says."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "jax_batchinhib"


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Map of the tree\n(.*?)^## ", text, re.M | re.S)
    assert match, "README.md has no '## Map of the tree' section followed by another section"
    return match.group(1)


def _tree_paths() -> list[str]:
    """The paths of the ```text block: two spaces of indent per level, the name first,
    then two or more spaces and its description."""
    block = re.search(r"```text\n(.*?)```", _section(), re.S)
    assert block, "the map has no ```text block"
    paths, parents = [], []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, line
        name = re.split(r"\s{2,}", line.strip())[0]
        depth = indent // 2
        parents = parents[:depth]
        paths.append("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def _levels() -> list[list[str]]:
    """The import line, ``**a → b, c → ...**``, as groups of module names, left to right."""
    line = re.search(r"^\*\*(.+→.+)\*\*$", _section(), re.M)
    assert line, "the map has no bold import line 'a → b → ...'"
    return [[n.strip() for n in group.split(",")] for group in line.group(1).split("→")]


def _module_of(path: pathlib.Path) -> str:
    """The map's name for a package file: ``ops`` for anything in ops/, ``apps`` for
    apps/, else the file's stem (``linen``, ``_modules``...)."""
    parts = path.relative_to(PKG).parts
    return parts[0] if len(parts) > 1 else path.stem


def _internal_imports(path: pathlib.Path) -> set[str]:
    """The map names of the package modules ``path`` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "jax_batchinhib" and len(parts) > 1:
                target = PKG.joinpath(*parts[1:])
                if target.is_dir() or target.with_suffix(".py").exists():
                    out.add(parts[1])
    return out


def test_every_path_in_the_map_exists():
    paths = _tree_paths()
    assert len(paths) >= 20, paths
    missing = [p for p in paths if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"README map names paths that do not exist: {missing}"
    for p in paths:
        assert (ROOT / p.rstrip("/")).is_dir() == p.endswith("/"), p


def test_every_file_of_the_package_and_docs_is_in_the_map():
    """A file the map does not list as a path is named in its folder's description:
    every module of ops/ and apps/ by its stem, every document of docs/ by its name."""
    block = re.search(r"```text\n(.*?)```", _section(), re.S).group(1)
    listed = {p.rstrip("/") for p in _tree_paths()}
    missing = []
    for path in [*PKG.rglob("*.py"), *(ROOT / "docs").glob("*.md")]:
        rel = str(path.relative_to(ROOT))
        word = path.name if path.suffix == ".md" else path.stem
        if (
            rel not in listed
            and path.stem != "__init__"
            and not re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", block)
        ):
            missing.append(rel)
    assert not missing, f"files the README map does not mention: {missing}"


def test_every_package_module_is_on_the_import_line():
    named = {n for group in _levels() for n in group}
    on_disk = {_module_of(p) for p in PKG.rglob("*.py")} - {"__init__", "__main__"}
    assert on_disk == named, (sorted(on_disk - named), sorted(named - on_disk))


def test_imports_go_the_way_the_map_says():
    level = {n: i for i, group in enumerate(_levels()) for n in group}
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_of(path)
        if me in ("__init__", "__main__"):  # the facade and the console entry point
            continue
        for other in _internal_imports(path) - {me}:
            if level[other] >= level[me]:
                wrong.append(f"{path.relative_to(ROOT)} ({me}) imports {other}")
    assert not wrong, "imports against the README map:\n" + "\n".join(wrong)


def test_the_check_can_fail():
    """The import check sees a same-level and an upward import."""
    level = {n: i for i, group in enumerate(_levels()) for n in group}
    assert level["nnx"] == level["linen"] < level["fold"] < level["apps"]
    assert "apps" in _internal_imports(PKG / "__main__.py")
    assert {"ops", "running"} <= _internal_imports(PKG / "linen.py")
