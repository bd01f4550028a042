"""Check an installed ringlm against the source tree: every module imports, and no other is installed.

scripts/check_wheel.sh runs this inside fresh venvs that hold only the built
wheel and its declared dependencies, so a module left out of the wheel (a
package setup.py did not find, a data file it did not ship) or a dependency
left out of an extra fails here, by name; so does a module the wheel holds and
the source tree does not (a stale build). A module that imports but comes from
the source tree rather than the installation fails too: it would prove nothing.

    python import_modules.py SOURCE_ROOT                      # every module: the root's and FOLDERS'
    python import_modules.py SOURCE_ROOT client --absent torch gguf
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

FOLDERS = ("idl", "ext", "server", "client")   # setup.py's FOLDERS: what installs under ringlm


def source_modules(root: Path, folders: list[str]) -> set[str]:
    """The ringlm.* name of every .py and .pyx file under the folders; with all of them, the root's too."""
    files = [path for folder in folders for path in (root / folder).rglob("*.py*") if path.suffix in (".py", ".pyx")]
    if set(folders) == set(FOLDERS):
        files += [path for path in root.glob("*.py") if path.name != "setup.py"]   # the build, not ringlm
    names = set()
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        names.add(".".join(("ringlm", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


def installed_modules(folders: list[str]) -> set[str]:
    """The ringlm.* modules the installation holds under the folders (with all of them, every one)."""
    import ringlm

    prefixes = tuple(f"ringlm.{folder}" for folder in folders)
    found = {"ringlm", *(module.name for module in pkgutil.walk_packages(ringlm.__path__, "ringlm.",
                                                                       onerror=lambda name: None))}
    return found if set(folders) == set(FOLDERS) else {name for name in found if name.startswith(prefixes)}


def check(root: Path, folders: list[str]) -> tuple[int, list[str]]:
    """Import every source module from the installation; the count, and the failures as 'name: why'."""
    expected = source_modules(root, folders)
    failures = []
    for name in sorted(expected):
        try:
            module = importlib.import_module(name)
        except Exception as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        origin = Path(module.__file__).resolve()
        if origin.is_relative_to(root):
            failures.append(f"{name}: imported from the source tree ({origin}), not from the installation")
    failures += [f"{name}: installed, but the source tree has no such module"
                 for name in sorted(installed_modules(folders) - expected)]
    return len(expected), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the source tree (the repository root)")
    parser.add_argument("folders", nargs="*", help=f"only the modules under these of {', '.join(FOLDERS)} "
                                                   "(default: every module)")
    parser.add_argument("--absent", nargs="+", default=[], metavar="PACKAGE",
                        help="packages that must not be installed (e.g. torch for the client)")
    args = parser.parse_args()
    if set(args.folders) - set(FOLDERS):
        parser.error(f"not a folder of ringlm: {', '.join(sorted(set(args.folders) - set(FOLDERS)))}")
    count, failures = check(args.root.resolve(), args.folders or list(FOLDERS))
    failures += [f"{package}: installed, and should not be" for package in args.absent
                 if importlib.util.find_spec(package) is not None]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"{count} modules checked in {sys.prefix}: {len(failures) or 'no'} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
