"""docs/settings.md against the code: every environment variable read is listed there,
nothing listed is read nowhere, and each literal default is the code's.

The variables are found by reading the source, so a setting added anywhere is caught:
Python (`env.<type>("NAME", default=...)`, `os.environ[...]`, `os.environ.get`,
`os.getenv`), the shell scripts and Procfile (`${NAME...}`, `$NAME`), and
docker-compose.yml (`${NAME...}`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "settings.md"
NOT_APP_CODE = {"tests", "bench", "var", "docs", "demo", "locale", "templates"}
ENV_READERS = {"os.environ.get", "os.getenv", "os.environ.setdefault"}
NAME = re.compile(r"[A-Z][A-Z0-9_]+")
# Variables a shell has anyway, not settings of this project.
SHELL_OWN = {"PATH", "HOME", "PWD", "USER", "CI"}


def _python_files():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NOT_APP_CODE or parts[0].startswith(".") or "migrations" in parts:
            continue
        yield path


def _env_call(node: ast.Call) -> bool:
    func = ast.unparse(node.func)
    if func in ENV_READERS:
        return True
    # django-environ: env.str(...), environ.Env().int(...)
    return isinstance(node.func, ast.Attribute) and "env" in ast.unparse(node.func.value).lower()


def python_reads(files=None) -> dict[str, set[str]]:
    """NAME -> its literal defaults, as the reference writes them (empty: none readable).
    A variable read in several places may have one default per place."""
    found: dict[str, set[str]] = {}
    for path in files if files is not None else _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name, default = None, None
            if isinstance(node, ast.Call) and node.args and _env_call(node):
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    name = first.value
                    given = [kw.value for kw in node.keywords if kw.arg == "default"]
                    given += node.args[1:2]
                    default = _literal(given[0]) if given else None
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    name = node.slice.value
            if name and NAME.fullmatch(name):
                found.setdefault(name, set()).update({default} if default is not None else ())
    return found


def _literal(node: ast.AST) -> str | None:
    """The default as docs/settings.md writes it, for a constant (arithmetic allowed)."""
    try:
        value = eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})  # noqa: S307
    except Exception:  # noqa: BLE001 - a default computed from other names: not compared
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def shell_reads() -> set[str]:
    files = [ROOT / "Procfile", *sorted((ROOT / "scripts").glob("*.sh"))]
    names: set[str] = set()
    for path in files:
        text = "\n".join(
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if not line.lstrip().startswith("#")
        )
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", text))
    return names - SHELL_OWN


def compose_reads() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))


def documented() -> dict[str, str]:
    """NAME -> default cell, from every table row of docs/settings.md."""
    rows: dict[str, str] = {}
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`([A-Z][A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def _rows(names) -> str:
    return "\n".join(f"| `{name}` | ... | ... |" for name in sorted(names))


def test_every_variable_the_code_reads_is_in_the_settings_reference():
    read = set(python_reads()) | shell_reads() | compose_reads()
    missing = read - set(documented())
    assert not missing, f"add these rows to {REFERENCE.name}:\n{_rows(missing)}"


def test_the_settings_reference_lists_only_variables_that_are_read():
    read = set(python_reads()) | shell_reads() | compose_reads()
    stale = set(documented()) - read
    assert not stale, f"{REFERENCE.name} lists variables nothing reads:\n{_rows(stale)}"


def test_the_settings_reference_gives_the_codes_defaults():
    rows = documented()
    wrong = []
    for name, defaults in sorted(python_reads().items()):
        if not defaults or name not in rows:
            continue
        cell = rows[name]
        shown = "" if cell == "(empty)" else cell.strip("`")
        # Read in several places (a setting and a module that runs before settings):
        # any of its literal defaults may be shown, "1" and "true" being one.
        accepted = defaults | ({"true"} if "1" in defaults else set())
        if shown not in accepted:
            wrong.append(f"{name}: the code says {sorted(defaults)}, the reference {cell!r}")
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_a_setting_added_to_the_code_with_its_default(tmp_path):
    module = tmp_path / "new_setting.py"
    module.write_text(
        "import os\nimport environ\nenv = environ.Env()\n"
        'A = env.int("RMASSIMO_NEW_LIMIT", default=60 * 5)\n'
        'B = env.bool("RMASSIMO_NEW_FLAG", default=False)\n'
        'C = os.environ.get("RMASSIMO_NEW_URL")\n'
    )
    assert python_reads([module]) == {
        "RMASSIMO_NEW_LIMIT": {"300"},
        "RMASSIMO_NEW_FLAG": {"false"},
        "RMASSIMO_NEW_URL": set(),
    }
