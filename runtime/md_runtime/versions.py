"""Versions: which library versions a model's files need. Part of the loader stage.

Train here, serve there: a model pickled on a laptop with current numpy and scikit-learn fails or warns
when an image with older pins loads it. `diagnose` turns those failures and warnings into one message that
names the libraries and the requirements.txt lines that fix it; `freeze` writes those lines where the model
was trained: the distributions package.py imports (itself or through its sibling modules), and those whose
objects the loaded model holds (what unpickling its files brought in).
"""

import ast
import gc
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Set

RUNTIME_DISTRIBUTION = "md-runtime"
FRAMEWORKS = ("xgboost", "lightgbm", "catboost", "torch", "tensorflow")  # say "version" when their files differ
WALK_LIMIT = 200000  # objects visited from the model; enough for any estimator, bounded for huge graphs

NUMPY_2 = re.compile(r"No module named '?numpy\._core")
SKLEARN_UNPICKLE = re.compile(r"Trying to unpickle estimator \w+ from version (\S+) when using version \S+")
MISSING_MODULE = re.compile(r"No module named '([\w.]+)'|Can't get attribute '\w+' on <module '([\w.]+)'")


class Mismatch(NamedTuple):
    distribution: str
    installed: Optional[str]
    needed: Optional[str]  # a requirement specifier such as "==1.5.2" or ">=2", when the message tells

    def requirement(self) -> str:
        return self.distribution + (self.needed or "")

    def describe(self) -> str:
        here = "{} {} here".format(self.distribution, self.installed or "missing")
        return here + (", the files need {}".format(self.requirement()) if self.needed else "")


def installed_version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def diagnose(texts: Iterable[str]) -> List[Mismatch]:
    """Library-version mismatches that load errors or warnings reveal, one per distribution."""
    found: Dict[str, Mismatch] = {}
    for text in texts:
        for mismatch in _mismatches_in(text):
            if mismatch.distribution not in found or mismatch.needed:
                found[mismatch.distribution] = mismatch
    return list(found.values())


def _mismatches_in(text: str) -> List[Mismatch]:
    if NUMPY_2.search(text):
        return [Mismatch("numpy", installed_version("numpy"), ">=2")]
    unpickle = SKLEARN_UNPICKLE.search(text)
    if unpickle:
        return [Mismatch("scikit-learn", installed_version("scikit-learn"), "==" + unpickle.group(1))]
    missing = MISSING_MODULE.search(text)
    if missing:
        distribution = distribution_of((missing.group(1) or missing.group(2)).split(".")[0])
        return [Mismatch(distribution, installed_version(distribution), None)] if distribution else []
    lowered = text.lower()
    return [Mismatch(name, installed_version(name), None) for name in FRAMEWORKS
            if name in lowered and "version" in lowered and installed_version(name)]


def warning_texts(caught: Iterable[warnings.WarningMessage]) -> List[str]:
    texts = []
    for item in caught:
        original = getattr(item.message, "original_sklearn_version", None)  # scikit-learn >= 1.3
        if original is not None:
            texts.append("Trying to unpickle estimator {} from version {} when using version {}".format(
                getattr(item.message, "estimator_name", "?"), original, getattr(item.message, "current_sklearn_version", "?")))
        else:
            texts.append(str(item.message))
    return texts


def exception_texts(exc: Optional[BaseException]) -> List[str]:
    texts = []
    while exc is not None:
        texts.append("{}: {}".format(type(exc).__name__, exc))
        exc = exc.__cause__ or exc.__context__
    return texts


def advice(mismatches: List[Mismatch]) -> str:
    pinned = [m.requirement() for m in mismatches if m.needed]
    lines = "add to requirements.txt: {}".format(", ".join(pinned)) if pinned else "pin them in requirements.txt"
    return (
        "the model's files were written by other library versions than this environment has ({}); {} "
        "(`md-runtime freeze MODEL_DIR`, run where the model was trained, writes the exact lines)".format(
            "; ".join(m.describe() for m in mismatches), lines)
    )


# --- freeze -----------------------------------------------------------------------------------------------


def top_level_imports(source: str, sibling_of: Path) -> Dict[str, bool]:
    """Top-level module names a file imports -> whether each is a sibling module of the model directory."""
    names: Dict[str, bool] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.name.split(".")[0]] = False
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: siblings in the model directory
                for target in [node.module] if node.module else [a.name for a in node.names]:
                    names[target.split(".")[0]] = True
            elif node.module:
                names[node.module.split(".")[0]] = False
    for name in names:
        names[name] = names[name] or _sibling_path(sibling_of, name) is not None
    return names


def _sibling_path(model_dir: Path, name: str) -> Optional[Path]:
    for path in (model_dir / (name + ".py"), model_dir / name / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(model_dir: Path) -> Set[str]:
    """Modules package.py imports, itself or through the sibling modules it imports."""
    seen: Set[str] = set()
    external: Set[str] = set()
    queue = [model_dir / "package.py"]
    while queue:
        path = queue.pop()
        if str(path) in seen:
            continue
        seen.add(str(path))
        for name, sibling in top_level_imports(path.read_text(), model_dir).items():
            found = _sibling_path(model_dir, name) if sibling else None
            if found is not None:
                queue.append(found)
            elif not sibling:
                external.add(name)
    return external


def held_modules(model: Any) -> Set[str]:
    """Top-level modules of the types of the objects the model holds (what unpickling brought in)."""
    modules: Set[str] = set()
    seen: Set[int] = set()
    queue = [model]
    while queue and len(seen) < WALK_LIMIT:
        obj = queue.pop()
        if id(obj) in seen or isinstance(obj, (type, type(sys), type(len), type(held_modules))):
            continue
        seen.add(id(obj))
        modules.add(type(obj).__module__.split(".")[0])
        queue.extend(ref for ref in gc.get_referents(obj) if not isinstance(ref, (str, bytes, int, float)))
    return modules


def _module_distributions() -> Dict[str, List[str]]:
    """Top-level module -> distributions providing it (importlib.metadata's packages_distributions, which
    Python 3.8 and 3.9 lack)."""
    from importlib import metadata

    mapping: Dict[str, List[str]] = {}
    for dist in metadata.distributions():
        tops = (dist.read_text("top_level.txt") or "").split()
        if not tops:
            tops = [str(f).split("/")[0].split(".")[0] for f in dist.files or [] if str(f).endswith(".py")]
        for top in set(tops):
            mapping.setdefault(top, []).append(dist.metadata["Name"])
    return mapping


def distribution_of(module: str) -> Optional[str]:
    names = _module_distributions().get(module)
    return names[0] if names else None


def freeze_lines(modules: Iterable[str]) -> List[str]:
    mapping = _module_distributions()
    pins: Dict[str, str] = {}
    for module in modules:
        for name in mapping.get(module, []):
            if normalize(name) != RUNTIME_DISTRIBUTION:
                pins[normalize(name)] = "{}=={}".format(name, installed_version(name))
    return [pins[key] for key in sorted(pins)]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def merge_requirements(existing: str, pins: List[str]) -> str:
    """Existing requirements.txt lines, with the pinned distributions' lines replaced by the pins."""
    pinned = {normalize(re.split(r"[=<>!~\[; ]", p, 1)[0]) for p in pins}
    kept = [line for line in existing.splitlines()
            if normalize(re.split(r"[=<>!~\[; #]", line.strip(), 1)[0]) not in pinned or not line.strip()]
    return "\n".join([line for line in kept if line.strip()] + pins) + "\n"
